"""Forwarding: backends behind one interface. So far: the MLLP client used by `isthmus send`."""
