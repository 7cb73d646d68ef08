"""Knative Service ``events-adapter``: bucket notification webhook -> CloudEvents -> sink.

Thin entry point (functions-framework HTTP function ``adapter``); the work, its answers and its
env are ``events.adapter.adapter``'s: a MinIO/S3 or SeaweedFS filer notification in, every
CloudEvent POSTed in binary mode to ``K_SINK`` (the SinkBinding's sink; locally the broker).
"""

from __future__ import annotations

from events.adapter import adapter
from readmission.glue import slow_clients

slow_clients.install()  # header and body read timeouts: docs/reliability.md

__all__ = ["adapter"]
