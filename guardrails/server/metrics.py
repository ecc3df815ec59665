"""Prometheus metrics of one server (its own registry, so two apps in one process never mix counts)."""

from __future__ import annotations

from typing import Any

from guardrails.core.outcomes import flags, is_block


class Metrics:
    """Requests, blocks, flags, errors, latency and time-to-first-token histograms, live streams."""

    def __init__(self) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError as exc:  # pragma: no cover - an extra of the server
            raise ImportError("the server needs prometheus_client: pip install 'sae-guardrails[server]'") from exc
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("guardrails_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.blocks = Counter("guardrails_blocks", "Blocked requests, by rule and scope", ["rule", "scope"], registry=r)
        self.flags = Counter("guardrails_flags", "Flag decisions, by rule and scope", ["rule", "scope"], registry=r)
        self.errors = Counter("guardrails_errors", "Errors, by kind (scoring, request, upstream, internal)",
                              ["kind"], registry=r)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.latency = Histogram("guardrails_request_latency_seconds", "Time from request to last byte",
                                 ["endpoint"], buckets=buckets, registry=r)
        self.ttft = Histogram("guardrails_time_to_first_token_seconds", "Time to the first released text",
                              buckets=buckets, registry=r)
        self.tokens = Counter("guardrails_completion_tokens", "Generated tokens released", registry=r)
        self.streams = Gauge("guardrails_active_streams", "Streams open now", registry=r)

    def decisions(self, decisions: list[Any]) -> None:
        """Count the block / flag / error decisions of one answer or scan."""
        for d in decisions:
            if is_block(d):
                self.blocks.labels(d.rule, d.scope).inc()
            elif d.action != "error" and flags(d.action, d.resolution):  # errors are counted below
                self.flags.labels(d.rule, d.scope).inc()
            if d.action == "error":
                self.errors.labels("scoring").inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
