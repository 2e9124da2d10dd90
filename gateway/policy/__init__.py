"""Policy: SMART scopes, minimum-necessary profiles and PHI redaction; who may see what.

Each is imported from its own module: a child of the edge installs the PHI filter
(`redact`) without the token signing (`jose`, cryptography's X.509) it never uses.
"""
