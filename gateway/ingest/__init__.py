"""Ingest: one MLLP message from frame to ACK and on to the local store.

`handler` parses, checks, translates, routes and commits a frame with its ACK (`answer`
builds the ACKs and refusals); `applier` applies committed translations to the FHIR store;
`replay` translates a stored message again as it was received. The MLLP listener sees
only `protocol`. Each is imported from its own module: a translator process takes
`prepare` without the handler and the applier.
"""
