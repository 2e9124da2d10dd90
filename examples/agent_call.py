#!/usr/bin/env python3
"""One whole agent call against a running Isthmus gateway: verify the caller, look up
their appointments, book the first free slot, end the session.

    python examples/agent_call.py --url http://127.0.0.1:8080 --api-key $AGENT_KEY \\
        --last-name Agentcanary-Smith --date-of-birth 1980-02-14 --phone "617 555 0142"

Standard library only, so it runs wherever the agent platform's code runs. Each POST
carries an Idempotency-Key: a retry after a timeout returns the first answer. Exit 0
when the call went through, 1 when the gateway refused a step (its error is printed).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
import uuid
from typing import Any


class Refused(Exception):
    def __init__(self, step: str, status: int, body: Any) -> None:
        super().__init__(f"{step}: HTTP {status} {json.dumps(body)}")


class AgentCall:
    """The agent API at `url`, as one agent client holding an API key."""

    def __init__(self, url: str, api_key: str, timeout: float = 5.0) -> None:
        self.base = url.rstrip("/") + "/agent/v1"
        self.api_key = api_key
        self.timeout = timeout
        self.token: str | None = None

    def call(self, step: str, method: str, path: str, body: Any = None) -> Any:
        headers = {"X-API-Key": self.api_key, "Accept": "application/json"}
        if self.token is not None:
            headers["X-Session-Token"] = self.token
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if method == "POST":
            headers["Idempotency-Key"] = str(uuid.uuid4())
        request = urllib.request.Request(self.base + path, data=data, headers=headers,
                                         method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            raise Refused(step, exc.code, json.loads(raw) if raw else None) from None
        return json.loads(raw) if raw else None


def run(args: argparse.Namespace) -> int:
    agent = AgentCall(args.url, args.api_key)
    said = {"last_name": args.last_name, "date_of_birth": args.date_of_birth}
    for factor in ("first_name", "phone", "mrn", "zip", "ssn_last4"):
        value = getattr(args, factor)
        if value:
            said[factor] = value
    session = agent.call("verify", "POST", "/sessions", {
        "purpose": "scheduling", "call_id": args.call_id or f"example-{uuid.uuid4()}",
        **said})
    agent.token = session["session_token"]
    print(f"verified: {session['patient']['first_name']} "
          f"{session['patient']['last_name_initial']}. "
          f"(session for {session['expires_in']} s)")
    try:
        for appointment in agent.call("lookup", "GET", "/appointments"):
            print(f"upcoming: {appointment['start']} {appointment['type'] or ''} with "
                  f"{appointment['provider_name'] or 'the clinic'}")
        slots = agent.call("slots", "GET", "/slots")
        if not slots:
            print("no free slot to offer")
            return 0
        slot = slots[0]
        booked = agent.call("book", "POST", "/appointments",
                            {"slot_id": slot["id"], "reason": args.reason})
        print(f"booked: {booked['start']} with {booked['provider_name'] or 'the clinic'} "
              f"at {booked['location'] or 'the clinic'} (appointment {booked['id']})")
    finally:
        agent.call("end", "DELETE", f"/sessions/{session['session_id']}")
        print("session ended")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--api-key", required=True, help="an API key with the agent scope")
    parser.add_argument("--call-id", help="the telephony call id (default: a new one)")
    parser.add_argument("--last-name", required=True)
    parser.add_argument("--first-name")
    parser.add_argument("--date-of-birth", required=True)
    second = parser.add_mutually_exclusive_group(required=True)
    second.add_argument("--phone")
    second.add_argument("--mrn")
    second.add_argument("--zip")
    second.add_argument("--ssn-last4", dest="ssn_last4")
    parser.add_argument("--reason", default="follow-up")
    try:
        return run(parser.parse_args(argv))
    except Refused as exc:
        print(f"refused at {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cannot reach the gateway: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
