"""Test support: builders, fakes of our peers (an EHR, an MLLP system), shared helpers."""
