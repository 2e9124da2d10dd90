"""Change events out to clients: FHIR Subscriptions (rest-hook) and `[[webhooks]]`.

The store records one change event per new version (gateway.store.events); the pump
(`pump.py`) reads them in order, matches each against the active Subscriptions and the
webhooks (`matcher.py`), renders what each target may receive (`payloads.py`), and queues
the deliveries in the durable outbox, where an `EventBackend` (`delivery.py`) posts them,
signed (`signing.py`). Subscription resources are checked and owned on the way in
(`subscriptions.py`). Event names are `<type>.<action>` (`catalogue.py`).
"""
