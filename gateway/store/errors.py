"""Store errors the layers above turn into answers (AR on MLLP, 503 on HTTP)."""


class StoreUnavailable(Exception):
    """The store cannot durably take or serve data right now; the reason holds no PHI."""
