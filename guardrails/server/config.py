"""Settings of the OpenAI-compatible server (``guardrails serve``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ServerConfig(BaseModel):
    """Limits, authentication and mode of one server."""

    model_config = ConfigDict(extra="forbid")

    model_name: str = Field(default="guardrails", description="Model id shown in GET /v1/models and in answers")
    api_key: str | None = Field(default=None, description="Bearer key every /v1 request must carry (None: no key)")
    max_body_bytes: int = Field(default=1_000_000, ge=1, description="Largest request body accepted (413 beyond)")
    max_messages: int = Field(default=256, ge=1, description="Most messages in one request")
    max_prompt_tokens: int = Field(default=4096, ge=1, description="Longest prompt after the chat template, in tokens")
    max_tokens_limit: int = Field(default=1024, ge=1, description="Largest max_tokens a request may ask for")
    default_max_tokens: int = Field(default=256, ge=1, description="max_tokens when a request gives none")
    max_streams: int = Field(default=32, ge=1, description="Most streaming requests open at once (429 beyond)")
    max_inflight: int = Field(default=256, ge=1, description="Most requests queued or running at once (429 beyond)")
    max_batch: int = Field(default=16, ge=1, description="Most requests decoded together in one batch")
    gather_ms: float = Field(default=2.0, ge=0, description="How long the scheduler waits for companions of a request")
    upstream: str | None = Field(default=None, description="Proxy mode: base URL of an OpenAI-compatible server "
                                 "(e.g. http://127.0.0.1:8001/v1); the local model only scans")
    upstream_api_key: str | None = Field(default=None, description="Bearer key sent to the upstream")
    upstream_timeout: float = Field(default=60.0, gt=0,
                                    description="Seconds to wait for the upstream (connect, each read)")
    scan_chars: int = Field(default=32, ge=1, description="Proxy streams: rescan after this many new characters")
    holdback_tokens: int = Field(default=2, ge=1, description="Proxy streams: trailing tokens held back until more "
                                 "text arrives (their tokenization may still change)")
