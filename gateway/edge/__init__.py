"""The edge: the MLLP listener and the aiohttp routes (FHIR REST, SMART token, reviewers' audit
endpoint): framing, authentication, answering. No translation here."""
