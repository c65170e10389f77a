"""`NecoClient`: dense features from a Triton server (Docker or embedded), over gRPC or HTTP.

The client learns everything model-specific (patch size, feature width, architecture) from
the served model config's `parameters`, which export writes and serving preserves, so it
needs no local model files and refuses models it does not understand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from neco.contract import DEFAULT_INPUT_SIZE, DEFAULT_MODEL_NAME, INPUT_IMAGES, OUTPUT_FEATURES, ModelContract
from neco.errors import InputError
from neco.signature import INPUT, InputLimits, check_images, output_shape
from neco.triton_config import config_problems, contract_from_config

from .bank import MemoryBank
from .errors import (
    ContractError,
    ImageError,
    InferenceError,
    ModelNotFoundError,
    ModelNotReadyError,
    ServerUnavailableError,
)
from .images import ImageLike, PreparedImage, SizeSpec, prepare_image
from .retrieval import NoveltyResult, SegmentationResult, is_saved_bank, novelty, segment

Protocol = Literal["grpc", "http"]
DEFAULT_URLS: dict[str, str] = {"grpc": "localhost:8001", "http": "localhost:8000"}
DEFAULT_SIZE = DEFAULT_INPUT_SIZE


@dataclass(frozen=True)
class DenseFeatures:
    """Dense patch features of one image and how they map to its pixels.

    Array-like: `np.asarray(dense)` is the (h, w, C) float32 feature grid.
    """

    features: np.ndarray
    """(h, w, C) float32, unit-norm per patch."""
    image: PreparedImage
    """The resized input; `image.patch_box(i, j)` gives the original pixels of patch (i, j)."""

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.features if dtype is None else self.features.astype(dtype)

    @property
    def grid(self) -> tuple[int, int]:
        return self.image.grid


class NecoClient:
    """A `FeatureBackend` over Triton: `features`, `segment`, and the served `contract`."""

    def __init__(
        self,
        url: str | None = None,
        protocol: Protocol = "grpc",
        model: str = DEFAULT_MODEL_NAME,
        size: SizeSpec = DEFAULT_SIZE,
        batch_size: int = 8,
        timeout_s: float = 60.0,
        limits: InputLimits | None = None,
    ) -> None:
        if protocol not in DEFAULT_URLS:
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.url = url or DEFAULT_URLS[protocol]
        self.protocol: Protocol = protocol
        self.model = model
        self.size = size
        self.timeout_s = timeout_s
        self.limits = limits or InputLimits()
        self._client = self._connect()
        config = self._model_config()
        self.contract: ModelContract = self._read_contract(config)
        self.batch_size = min(batch_size, config.max_batch_size) if config.max_batch_size > 0 else batch_size

    # --- connection and discovery ---------------------------------------------------------
    def _connect(self) -> Any:
        try:
            if self.protocol == "grpc":
                import tritonclient.grpc as triton

                client = triton.InferenceServerClient(self.url)
                live = client.is_server_live(client_timeout=self.timeout_s)
            else:
                import tritonclient.http as triton

                client = triton.InferenceServerClient(
                    self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
                )
                live = client.is_server_live()
        except (InferenceServerException, OSError) as exc:  # gRPC status / HTTP socket errors
            raise ServerUnavailableError(self.url, f"{self.protocol}: {exc}") from None
        if not live:
            raise ServerUnavailableError(self.url, "the server reports it is not live")
        return client

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one server call; a lost connection and a refused request get different errors."""
        try:
            return fn(*args, **kwargs)
        except InferenceServerException as exc:
            if "UNAVAILABLE" in str(exc.status()):
                raise ServerUnavailableError(self.url, f"{what}: {exc.message()}") from None
            raise InferenceError(f"{what} on {self.url!r} ({self.protocol}) failed: {exc.message()}") from None
        except OSError as exc:
            raise ServerUnavailableError(self.url, f"{what}: {exc}") from None

    def _served_models(self) -> str:
        """Names in the repository index, for error messages; servers may restrict the endpoint."""
        try:
            if self.protocol == "grpc":
                entries = self._client.get_model_repository_index(as_json=True).get("models", [])
            else:
                entries = self._client.get_model_repository_index()
        except (InferenceServerException, OSError):  # PyTriton protects this endpoint with a token
            return ""
        return f"; it serves {sorted(entry.get('name', '') for entry in entries)}"

    def _model_config(self) -> mc.ModelConfig:
        timeout = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        try:
            ready = self._client.is_model_ready(self.model, **timeout)
        except InferenceServerException as exc:
            if "UNAVAILABLE" in str(exc.status()):
                raise ServerUnavailableError(self.url, f"readiness check: {exc.message()}") from None
            ready = False
        except OSError as exc:
            raise ServerUnavailableError(self.url, f"readiness check: {exc}") from None
        if not ready:
            try:  # Triton answers metadata requests for loaded models only; its error says why
                self._client.get_model_metadata(self.model, **timeout)
                reason = "reports it is not ready"
            except InferenceServerException as exc:
                reason = exc.message() or str(exc)
            if "unknown model" in reason.lower() or "not found" in reason.lower():
                raise ModelNotFoundError(
                    f"model {self.model!r} is not on the server at {self.url!r}{self._served_models()} ({reason})"
                )
            raise ModelNotReadyError(f"model {self.model!r} on {self.url!r} is not ready ({reason})")
        if self.protocol == "grpc":
            return self._call("get_model_config", self._client.get_model_config, self.model, **timeout).config
        as_json = self._call("get_model_config", self._client.get_model_config, self.model)
        return json_format.ParseDict(as_json, mc.ModelConfig(), ignore_unknown_fields=True)

    def _read_contract(self, config: mc.ModelConfig) -> ModelContract:
        try:
            contract = contract_from_config(config)
        except ValueError as exc:
            raise ContractError(f"model {self.model!r} on {self.url!r}: contract not understood: {exc}") from None
        problems = config_problems(config, required=(INPUT_IMAGES, OUTPUT_FEATURES))
        if problems:
            raise ContractError(f"model {self.model!r} on {self.url!r}: " + "; ".join(problems))
        return contract

    # --- features -------------------------------------------------------------------------
    def _infer(self, batch: np.ndarray) -> np.ndarray:
        if self.protocol == "grpc":
            import tritonclient.grpc as triton
        else:
            import tritonclient.http as triton
        try:
            batch = check_images(batch, self.limits)
        except InputError as exc:
            raise ImageError(f"not sent to {self.url!r}: {exc}") from None
        request = triton.InferInput(INPUT.name, list(batch.shape), INPUT.triton_dtype)
        request.set_data_from_numpy(batch)
        wanted = [triton.InferRequestedOutput(OUTPUT_FEATURES)]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        result = self._call("inference", self._client.infer, self.model, [request], outputs=wanted, **kwargs)
        features = result.as_numpy(OUTPUT_FEATURES)
        if features is None:
            raise InferenceError(f"model {self.model!r} on {self.url!r} returned no {OUTPUT_FEATURES!r} output")
        expected = output_shape(OUTPUT_FEATURES, *batch.shape[:3], self.contract.embed_dim)
        if features.shape != expected:
            raise ContractError(
                f"model {self.model!r} on {self.url!r} returned {OUTPUT_FEATURES!r} of shape {features.shape} "
                f"for input {batch.shape}; its contract implies {expected}"
            )
        return np.asarray(features, dtype=np.float32)

    def _features_of_prepared(self, prepared: Sequence[PreparedImage]) -> list[np.ndarray]:
        """Infer same-size images together (one request per size, at most `batch_size` each)."""
        out: list[np.ndarray | None] = [None] * len(prepared)
        by_size: dict[tuple[int, int], list[int]] = {}
        for position, item in enumerate(prepared):
            by_size.setdefault(item.size, []).append(position)
        for positions in by_size.values():
            for start in range(0, len(positions), self.batch_size):
                chunk = positions[start : start + self.batch_size]
                batch = np.stack([prepared[i].array for i in chunk])
                for i, grid in zip(chunk, self._infer(batch)):
                    out[i] = grid
        return [grid for grid in out if grid is not None]

    def prepare(self, image: ImageLike) -> PreparedImage:
        """Decode and resize one image with this client's size and the served patch size."""
        return prepare_image(image, self.size, self.contract.patch_size)

    def features(self, images: ImageLike | Sequence[ImageLike]) -> DenseFeatures | list[DenseFeatures]:
        """Dense features of one image (-> DenseFeatures) or a list (-> list, batched requests).

        Paths, bytes and PIL images are decoded and resized by the client's policy (`size`).
        A uint8 HxWx3 array whose sides are multiples of the patch size is taken as already
        prepared and sent unchanged: that is what `FeatureBackend` callers (bank building,
        `segment`) pass, and resizing it again would break their patch/mask alignment. Other
        arrays follow the policy. `np.stack(client.features(batch))` is the protocol's
        (B, h, w, C) array.
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        if not items:
            return []
        prepared = [self._prepare_or_keep(item) for item in items]
        dense = [DenseFeatures(grid, image) for grid, image in zip(self._features_of_prepared(prepared), prepared)]
        return dense[0] if single else dense

    def _prepare_or_keep(self, image: ImageLike) -> PreparedImage:
        """FeatureBackend callers pass arrays already resized by the policy: do not resize twice."""
        patch = self.contract.patch_size
        if (
            isinstance(image, np.ndarray)
            and image.dtype == np.uint8
            and image.ndim == 3
            and image.shape[2] == 3
            and image.shape[0] % patch == 0
            and image.shape[1] % patch == 0
        ):
            size = (image.shape[0], image.shape[1])
            return PreparedImage(np.ascontiguousarray(image), size, (size[0] // patch, size[1] // patch), patch)
        return self.prepare(image)

    def segment(self, image: ImageLike, support: Any, **options: Any) -> SegmentationResult:
        """Segment `image` against a bank, a saved bank folder or (image, mask) pairs.

        Same as `neco.client.segment(client, image, support, **options)`, except that a bank
        built on the fly from pairs or a folder uses this client's `size` unless told otherwise
        (a bank brings its own).
        """
        if "size" not in options and not isinstance(support, MemoryBank) and not is_saved_bank(support):
            options["size"] = self.size
        return segment(self, image, support, **options)

    def novelty(self, image: ImageLike, support: Any, **options: Any) -> NoveltyResult:
        """Novelty map, image score and decision of `image` against a bank (see `neco.client.novelty`);
        a bank built on the fly uses this client's `size`, as in `segment`."""
        if "size" not in options and not isinstance(support, MemoryBank) and not is_saved_bank(support):
            options["size"] = self.size
        return novelty(self, image, support, **options)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> NecoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NecoClient({self.url!r}, protocol={self.protocol!r}, model={self.model!r}, {self.contract.arch})"
