"""`ServeConfig`: every knob of the embedded Triton server, validated before anything starts.

Kept free of pytriton/onnxruntime imports so that `neco serve --help` and config validation
work in a client-only install. Batching settings default to `None`, meaning "take them from
the model's config.pbtxt", so the embedded server batches exactly like the Docker Triton
serving the same repository unless the user deliberately overrides them.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from neco.contract import DEFAULT_MODEL_NAME
from neco.signature import InputLimits

DEFAULT_MAX_QUEUE_SIZE: int = 64
"""Queue bound used when neither ServeConfig nor config.pbtxt sets one: the queue is never unbounded."""
DEFAULT_REQUEST_TIMEOUT_MS: int = 30_000
"""Queue timeout used when neither ServeConfig nor config.pbtxt sets one."""

KNOWN_PROVIDERS: tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")
"""onnxruntime execution providers the embedded server knows how to configure, in preference order."""


class BodyLimits(BaseModel):
    """How the request gateway holds request bodies while it reads and checks them.

    `InputLimits` bound one request; these bound time and the sum over connections, so that
    unfinished bodies (a chunked body never ended) and many large JSON bodies at once cannot
    hold the gateway's memory or its one event loop.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    read_timeout_s: float = Field(
        default=30.0, gt=0, description="a body not fully received this long after its headers gets 408, closed"
    )
    max_held_bytes: int = Field(
        default=512 * 2**20,
        ge=2**20,
        description="bytes of bodies held over all connections (at least one largest body); beyond it 503, retryable",
    )
    large_body_bytes: int = Field(
        default=2**20, ge=1, description="JSON headers / gRPC messages this long or more are parsed on a worker thread"
    )
    max_large_bodies: int = Field(default=1, ge=1, description="large headers / messages parsed at once; others wait")


class ServeConfig(BaseModel):
    """Configuration of one embedded (PyTriton) Triton server over a model repository."""

    model_config = ConfigDict(extra="forbid")

    repository: Path = Field(description="Triton model repository written by `neco export`")
    model_name: str = Field(default=DEFAULT_MODEL_NAME, pattern=r"^[A-Za-z0-9._-]+$")

    host: str = Field(default="127.0.0.1", description="address every endpoint binds to")
    http_port: int = Field(default=8000, ge=0, le=65535, description="0 = pick a free port")
    grpc_port: int = Field(default=8001, ge=0, le=65535, description="0 = pick a free port")
    metrics_port: int = Field(default=8002, ge=0, le=65535, description="0 = pick a free port")

    max_batch_size: int | None = Field(default=None, ge=1, description="None = from config.pbtxt")
    preferred_batch_sizes: list[int] | None = Field(default=None, description="None = from config.pbtxt")
    max_queue_delay_us: int | None = Field(default=None, ge=0, description="None = from config.pbtxt")

    max_queue_size: int | None = Field(
        default=None,
        ge=1,
        description="requests beyond this many queued are rejected (UNAVAILABLE); None = from config.pbtxt",
    )
    request_timeout_ms: int | None = Field(
        default=None, ge=1, description="a request still queued after this long is rejected; None = from config.pbtxt"
    )

    providers: list[str] | None = Field(
        default=None, description="onnxruntime providers; None = CUDA when available, else CPU"
    )
    intra_op_threads: int = Field(default=0, ge=0, description="onnxruntime intra-op threads; 0 = all cores")

    limits: InputLimits = Field(default_factory=InputLimits, description="largest side / pixels a request may hold")
    bodies: BodyLimits = Field(default_factory=BodyLimits, description="body read deadline and held-bytes cap")

    restart_on_backend_failure: bool = Field(
        default=True,
        description="restart tritonserver when its python backend dies; False = stop, and `neco serve` exits 1",
    )

    log_verbose: int = Field(default=0, ge=0, description="Triton's verbose log level (with verbose=true)")
    verbose: bool = Field(
        default=False,
        description="Triton's log and PyTriton's INFO lines on the console; false: Triton logs to a file in its "
        "workspace and only its last lines are reported when it fails",
    )

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("providers must not be empty (use null for automatic selection)")
        unknown = [p for p in value if p not in KNOWN_PROVIDERS]
        if unknown:
            raise ValueError(f"unknown onnxruntime providers {unknown}; known: {list(KNOWN_PROVIDERS)}")
        return value

    @field_validator("preferred_batch_sizes")
    @classmethod
    def _positive_sizes(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(size < 1 for size in value):
            raise ValueError(f"preferred_batch_sizes must be positive, got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        if self.max_batch_size and self.preferred_batch_sizes and max(self.preferred_batch_sizes) > self.max_batch_size:
            raise ValueError(
                f"preferred_batch_sizes {self.preferred_batch_sizes} exceed max_batch_size {self.max_batch_size}"
            )
        fixed = [p for p in (self.http_port, self.grpc_port, self.metrics_port) if p != 0]
        if len(fixed) != len(set(fixed)):
            raise ValueError(
                f"http_port, grpc_port and metrics_port must differ "
                f"(got {self.http_port}, {self.grpc_port}, {self.metrics_port})"
            )
        return self


class GatewayConfig(BaseModel):
    """The request gateway alone, in front of a Triton it does not start (docker compose, a sidecar).

    The embedded server runs the same gateway itself; this is for the official Triton image,
    which would otherwise allocate whatever a request declares (see neco.serving.gateway).
    """

    model_config = ConfigDict(extra="forbid")

    upstream_host: str = Field(description="host of the Triton the gateway forwards to (e.g. the compose service)")
    upstream_http_port: int = Field(default=8000, ge=1, le=65535, description="that Triton's HTTP port")
    upstream_grpc_port: int = Field(default=8001, ge=1, le=65535, description="that Triton's gRPC port")
    host: str = Field(default="127.0.0.1", description="address the gateway binds to")
    http_port: int = Field(default=8000, ge=0, le=65535, description="public HTTP port (0 = a free one)")
    grpc_port: int = Field(default=8001, ge=0, le=65535, description="public gRPC port (0 = a free one)")
    limits: InputLimits = Field(default_factory=InputLimits, description="largest side / pixels a request may hold")
    bodies: BodyLimits = Field(default_factory=BodyLimits, description="body read deadline and held-bytes cap")
