"""`AppConfig`: every setting of `neco app`, the in-context segmentation web page.

Kept free of FastAPI/uvicorn imports so that `neco --help` and config validation work in a
client-only install; `neco.app.server` (the `app` extra) is imported only to run the page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from neco.contract import DEFAULT_K, DEFAULT_MODEL_NAME, DEFAULT_TEMPERATURE

MIB = 1024 * 1024
MIN_TEMPERATURE = 1e-4
"""Smallest softmax temperature the page takes: similarities / 1e-300 overflow float32 to inf."""
MAX_TEMPERATURE = 100.0


class AppConfig(BaseModel):
    """The page's address, the Triton server it talks to, where saved banks live, request limits."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", description="address the page binds to; loopback unless set on purpose")
    port: int = Field(default=7860, ge=0, le=65535, description="HTTP port of the page (0 = pick a free one)")

    url: str | None = Field(default=None, description="Triton host:port; None = localhost:8001 (grpc) / 8000 (http)")
    protocol: Literal["grpc", "http"] = "grpc"
    model: str = Field(default=DEFAULT_MODEL_NAME, description="Triton model name")
    timeout_s: float = Field(default=60.0, gt=0, description="seconds per server request, retries included")
    size: Union[int, tuple[int, int], None] = Field(
        default=None,
        description="resize policy of banks built from painted or uploaded supports when the page's size control "
        "is on auto; None = the support images' own size (median shorter side). Saved banks bring their own",
    )
    examples: Path | None = Field(
        default=None, description="support folder (images/, masks/) or folder of them offered as clickable examples"
    )

    banks: Path = Field(
        default=Path("banks"), description="folder whose sub-folders are saved banks (`neco bank build`)"
    )
    bank_cache: int = Field(default=4, ge=0, description="saved banks kept loaded in memory")

    max_upload_mb: float = Field(default=16.0, gt=0, description="largest request body (all files together), MiB")
    max_unpacked_mb: float = Field(default=64.0, gt=0, description="largest total size of the files inside a zip, MiB")
    max_support_images: int = Field(default=32, ge=1, description="most support images one upload may hold")
    max_queries: int = Field(default=16, ge=1, description="most query images one request segments")
    max_image_pixels: int = Field(
        default=4096 * 4096, ge=1, description="largest decoded image or mask (height x width), checked from its header"
    )
    max_request_pixels: int = Field(
        default=5 * 4096 * 4096, ge=1, description="decoded pixels of one request's images and masks together"
    )
    max_classes: int = Field(default=256, ge=1, description="most classes of a bank the page segments with")
    max_transfer_mb: float = Field(
        default=128.0, gt=0, description="label transfer's query patches x k x classes float32 scores, MiB"
    )

    k: int = Field(default=DEFAULT_K, ge=1, description="default neighbours per patch shown on the page")
    temperature: float = Field(
        default=DEFAULT_TEMPERATURE, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE, description="default softmax temperature"
    )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MIB)

    @property
    def max_unpacked_bytes(self) -> int:
        return int(self.max_unpacked_mb * MIB)

    @property
    def max_transfer_bytes(self) -> int:
        return int(self.max_transfer_mb * MIB)
