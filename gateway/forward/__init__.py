"""Forwarding: backends behind one interface (remote FHIR, downstream MLLP, the local store),
routing, per-backend resilience and outbound tokens, the outbox workers, the facade's cache."""
