"""The edge: the MLLP listener and the HTTP routes. Framing, authentication, answering."""
