"""`NecoClient`: dense features from a Triton server (Docker or embedded), over gRPC or HTTP.

The client learns everything model-specific (patch size, feature width, architecture) from
the served model config's `parameters`, which export writes and serving preserves, so it
needs no local model files and refuses models it does not understand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from neco.client.backend import batch_features, prepare_for
from neco.client.errors import (
    ClientError,
    ContractError,
    ImageError,
    InferenceError,
    ModelNotFoundError,
    ModelNotReadyError,
    ServerUnavailableError,
)
from neco.client.images import ImageLike, PreparedImage, SizeSpec
from neco.client.retrieval import NoveltyResult, SegmentationResult, novelty, segment
from neco.client.transport import Endpoints, RetryPolicy, call_with_retries, parse_urls, translate
from neco.contract import DEFAULT_INPUT_SIZE, DEFAULT_MODEL_NAME, INPUT_IMAGES, OUTPUT_FEATURES, ModelContract
from neco.errors import InputError, MissingExtraError
from neco.signature import INPUT, InputLimits, check_images
from neco.triton_config import config_problems, contract_from_config

Protocol = Literal["grpc", "http"]
DEFAULT_URLS: dict[str, str] = {"grpc": "localhost:8001", "http": "localhost:8000"}
DEFAULT_SIZE = DEFAULT_INPUT_SIZE
T = TypeVar("T")
ServerCall = Callable[[Any, str, dict[str, float]], T]
"""`call(server, url, timeout_kwargs)`: one request to one tritonclient client."""


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
    """A `FeatureBackend` over Triton: `features`, `segment`, and the served `contract`.

    `url` is one `host:port`, a list of them (or a comma-separated string), or a
    `dns:///name:port` that resolves to several servers: requests go round-robin over
    them, with failover and retries by `retry` (see `neco.client.transport`), each call
    bounded by `timeout_s`. All servers must serve the same exported model.
    """

    def __init__(
        self,
        url: str | Sequence[str] | None = None,
        protocol: Protocol = "grpc",
        model: str = DEFAULT_MODEL_NAME,
        size: SizeSpec = DEFAULT_SIZE,
        batch_size: int = 8,
        timeout_s: float = 60.0,
        limits: InputLimits | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        if protocol not in DEFAULT_URLS:
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.protocol: Protocol = protocol
        self.urls = parse_urls(url if url is not None else DEFAULT_URLS[protocol])
        self.url = self.urls[0]
        """The first server: the one single-server callers gave."""
        self.model = model
        self.size = size
        self.timeout_s = timeout_s
        self.limits = limits or InputLimits()
        self.retry = retry if retry is not None else RetryPolicy()
        self._endpoints = Endpoints(self.urls, cooldown_s=max(self.retry.max_backoff_s, 0.5))
        self._servers: dict[str, Any] = {}
        try:
            for server_url in self.urls:
                self._servers[server_url] = self._connect(server_url)
            config = self._discover()
        except BaseException:
            self.close()
            raise
        self.contract: ModelContract = self._read_contract(config)
        self.batch_size = min(batch_size, config.max_batch_size) if config.max_batch_size > 0 else batch_size

    # --- connection and discovery ---------------------------------------------------------
    def _connect(self, url: str) -> Any:
        """A tritonclient client for one server; it connects lazily, on the first request."""
        if self.protocol == "grpc":
            import tritonclient.grpc as triton

            return triton.InferenceServerClient(url, channel_args=_grpc_channel_args(self.retry))
        return _http_client(url, self.timeout_s)

    def _attempt(self, what: str, call: ServerCall[T], url: str, seconds_left: float) -> T:
        """One try of `call(server, url, timeout_kwargs)` on one server; any failure becomes a typed error."""
        try:
            if self.protocol == "grpc":
                return call(self._servers[url], url, {"client_timeout": seconds_left})
            import gevent

            with gevent.Timeout(seconds_left, TimeoutError()):  # tritonclient.http has no per-call deadline
                return call(self._servers[url], url, {})
        except ClientError:
            raise
        except Exception as exc:  # every transport library's failure (see transport.translate)
            raise translate(exc, url, self.protocol, what) from None

    def _request(self, what: str, call: ServerCall[T]) -> T:
        """`call` on the next server in turn, failing over and retrying by `self.retry` within `timeout_s`."""
        return call_with_retries(
            lambda url, seconds_left: self._attempt(what, call, url, seconds_left),
            self._endpoints,
            self.retry,
            self.timeout_s,
        )

    def _discover(self) -> mc.ModelConfig:
        """The model config of the first server that answers; every other reachable one must agree."""
        answered: list[str] = []

        def config_of(server: Any, url: str, timeout: dict[str, float]) -> mc.ModelConfig:
            config = self._model_config(server, url, timeout)
            answered.append(url)
            return config

        config = self._request("discovery", config_of)
        contract = self._read_contract(config, answered[0])
        for url in self.urls:
            if url == answered[0]:
                continue
            try:
                other = self._attempt("discovery", self._model_config, url, self.timeout_s)
            except ServerUnavailableError:
                self._endpoints.failed(url)  # down now: tried again after its cooldown
                continue
            if self._read_contract(other, url) != contract:
                raise ContractError(
                    f"model {self.model!r} differs between {answered[0]!r} and {url!r}: "
                    "every server must serve the same exported model"
                )
        return config

    def _served_models(self, server: Any) -> str:
        """Names in the repository index, for error messages; servers may restrict the endpoint."""
        try:
            if self.protocol == "grpc":
                entries = server.get_model_repository_index(as_json=True).get("models", [])
            else:
                entries = server.get_model_repository_index()
        except Exception:  # PyTriton protects this endpoint with a token; the list is only a hint
            return ""
        return f"; it serves {sorted(entry.get('name', '') for entry in entries)}"

    def _model_config(self, server: Any, url: str, timeout: dict[str, float]) -> mc.ModelConfig:
        """Liveness, model readiness (with the server's reason when not ready) and the model config."""
        if not server.is_server_live(**timeout):
            raise ServerUnavailableError(url, "the server reports it is not live")
        try:
            ready = server.is_model_ready(self.model, **timeout)
        except InferenceServerException as exc:
            if "UNAVAILABLE" in str(exc.status()):
                raise
            ready = False
        if not ready:
            try:  # Triton answers metadata requests for loaded models only; its error says why
                server.get_model_metadata(self.model, **timeout)
                reason = "reports it is not ready"
            except InferenceServerException as exc:
                reason = exc.message() or str(exc)
            if "unknown model" in reason.lower() or "not found" in reason.lower():
                raise ModelNotFoundError(
                    f"model {self.model!r} is not on the server at {url!r}{self._served_models(server)} ({reason})"
                )
            raise ModelNotReadyError(f"model {self.model!r} on {url!r} is not ready ({reason})")
        if self.protocol == "grpc":
            return server.get_model_config(self.model, **timeout).config
        return json_format.ParseDict(server.get_model_config(self.model), mc.ModelConfig(), ignore_unknown_fields=True)

    def _read_contract(self, config: mc.ModelConfig, url: str | None = None) -> ModelContract:
        url = url or self.url
        try:
            contract = contract_from_config(config)
        except ValueError as exc:
            raise ContractError(f"model {self.model!r} on {url!r}: contract not understood: {exc}") from None
        problems = config_problems(config, required=(INPUT_IMAGES, OUTPUT_FEATURES))
        if problems:
            raise ContractError(f"model {self.model!r} on {url!r}: " + "; ".join(problems))
        return contract

    # --- features -------------------------------------------------------------------------
    def _infer(self, batch: np.ndarray) -> np.ndarray:
        if self.protocol == "grpc":
            import tritonclient.grpc as triton
        else:
            import tritonclient.http as triton
        try:
            batch = check_images(batch, self.limits, patch_size=self.contract.patch_size)
        except InputError as exc:
            raise ImageError(f"not sent to {self.url!r}: {exc}") from None
        request = triton.InferInput(INPUT.name, list(batch.shape), INPUT.triton_dtype)
        request.set_data_from_numpy(batch)
        wanted = [triton.InferRequestedOutput(OUTPUT_FEATURES)]
        result = self._request(
            "inference", lambda server, _url, timeout: server.infer(self.model, [request], outputs=wanted, **timeout)
        )
        features = result.as_numpy(OUTPUT_FEATURES)
        if features is None:
            raise InferenceError(f"model {self.model!r} on {self.url!r} returned no {OUTPUT_FEATURES!r} output")
        return features

    def prepare(self, image: ImageLike) -> PreparedImage:
        """Decode and resize one image with this client's size, limits and the served patch size.

        The limits are checked from the image header, before decoding, so a file the server
        would refuse costs no memory here either.
        """
        return prepare_for(self, image, self.size)

    def features(
        self, images: ImageLike | PreparedImage | Sequence[ImageLike | PreparedImage]
    ) -> np.ndarray | DenseFeatures | list[DenseFeatures]:
        """Dense features of a batch, of one image (-> DenseFeatures) or of a list (-> list).

        A uint8 [B, H, W, 3] array is the `FeatureBackend` call: images already prepared by
        the policy, sent unchanged in requests of at most `batch_size`, answered with the
        [B, h, w, C] array (use `batch_features`, which checks it). Anything else is decoded
        and resized by the client's policy (`size`), except a `PreparedImage`, which is sent
        as it is; same-size images share requests. `np.stack(client.features(images))` is the
        protocol's [B, h, w, C] array.
        """
        if isinstance(images, np.ndarray) and images.ndim == 4:
            chunks = range(0, len(images) or 1, self.batch_size)  # an empty batch is refused by _infer
            return np.concatenate([self._infer(images[start : start + self.batch_size]) for start in chunks])
        single = not isinstance(images, (list, tuple))
        prepared = [
            item if isinstance(item, PreparedImage) else self.prepare(item) for item in ([images] if single else images)
        ]
        by_size: dict[tuple[int, int], list[int]] = {}
        for position, item in enumerate(prepared):
            by_size.setdefault(item.size, []).append(position)
        dense: dict[int, DenseFeatures] = {}
        for positions in by_size.values():
            grids = batch_features(self, np.stack([prepared[i].array for i in positions]))
            dense.update((i, DenseFeatures(grid, prepared[i])) for i, grid in zip(positions, grids))
        return dense[0] if single else [dense[i] for i in range(len(prepared))]

    def segment(self, image: ImageLike, support: Any, **options: Any) -> SegmentationResult:
        """Segment `image` against a bank, a saved bank folder or (image, mask) pairs.

        Same as `neco.client.segment(client, image, support, **options)`: a bank brings its own
        size, a bank built on the fly from pairs or a folder uses `size=` or the support images'
        own size (`neco.client.size_policy`), not this client's `size`, which is for `features`.
        """
        return segment(self, image, support, **options)

    def novelty(self, image: ImageLike, support: Any, **options: Any) -> NoveltyResult:
        """Novelty map, image score and decision of `image` against a bank (see `neco.client.novelty`);
        sizes as in `segment`."""
        return novelty(self, image, support, **options)

    def close(self) -> None:
        for server in self._servers.values():
            server.close()

    def __enter__(self) -> NecoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        urls = self.url if len(self.urls) == 1 else self.urls
        return f"NecoClient({urls!r}, protocol={self.protocol!r}, model={self.model!r}, {self.contract.arch})"


def _http_client(url: str, timeout_s: float) -> Any:
    """tritonclient's HTTP client (the `client-http` extra: geventhttpclient), minus its "Exception
    ignored in __del__" when `__init__` fails: its `__del__` calls `close()`, which reads `_closed`, set
    only at the end of `__init__`; a class default makes a half-built client's `close()` a no-op."""
    try:
        import tritonclient.http as tritonclient_http
    except ModuleNotFoundError as exc:
        raise MissingExtraError("NecoClient(protocol='http')", exc.name or "geventhttpclient", "client-http") from None

    class HttpClient(tritonclient_http.InferenceServerClient):
        _closed = True

    return HttpClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)


def _grpc_channel_args(retry: RetryPolicy) -> list[tuple[str, Any]]:
    """tritonclient's default channel options, with reconnection no slower than `retry`'s backoff.

    gRPC's own reconnect backoff grows to 120 s, so a restarted server would stay unused for
    minutes while the channel waits; capping it lets retries reach the server again.
    """
    longest_ms = max(int(retry.max_backoff_s * 1000), 100)
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.initial_reconnect_backoff_ms", min(max(int(retry.initial_backoff_s * 1000), 100), longest_ms)),
        ("grpc.min_reconnect_backoff_ms", min(max(int(retry.initial_backoff_s * 1000), 100), longest_ms)),
        ("grpc.max_reconnect_backoff_ms", longest_ms),
    ]
