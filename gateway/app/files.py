"""Where the gateway keeps its files in the data dir (every process names them here)."""

INBOX_FILE = "inbox.db"
FHIR_FILE = "fhir.db"
AUTH_FILE = "auth.db"  # the client assertion ids already used (replay protection)
KEYS_DIR = "keys"
