"""Counting one S3 operation's requests, and the most in flight at once, from boto3's own
before-call/after-call events on a tier's client."""

from __future__ import annotations

import threading


class CallsInFlight:
    def __init__(self, client, operation: str):
        self.operation = operation
        self.calls = self.in_flight = self.most = 0
        self._lock = threading.Lock()
        client.meta.events.register("before-call.s3", self._sent)
        client.meta.events.register("after-call.s3", self._answered)

    def _sent(self, model, **_):
        if model.name == self.operation:
            with self._lock:
                self.calls += 1
                self.in_flight += 1
                self.most = max(self.most, self.in_flight)

    def _answered(self, model, **_):
        if model.name == self.operation:
            with self._lock:
                self.in_flight -= 1
