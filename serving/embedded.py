"""`EmbeddedServer`: a real Triton Inference Server started in-process through PyTriton.

It serves the repository's `model.onnx` under the same model name, tensor names, dtypes,
shapes, batching settings and contract `parameters` as the Docker Triton serving the same
repository, so one client works against both. Its public HTTP and gRPC ports belong to a
`RequestGateway` (`neco.serving.gateway`) that checks every request before tritonserver, bound
to private loopback ports, sees it.

What PyTriton 0.7 cannot do as needed (the stub's libpython, a command line without a secret,
the contract `parameters` in the served config, its private handles) is done by the shims of
`neco.serving.pytriton_compat`; this module is the server's life cycle: ports, start, supervision
and restart under one lock, signals, stop. `start()` reads the served config back from the
running server and fails if the contract did not survive.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType

from pytriton.client.exceptions import PyTritonClientTimeoutError
from pytriton.triton import Triton, TritonConfig
from pytriton.utils.workspace import Workspace
from tritonclient.grpc import model_config_pb2

from neco.contract import ModelContract
from neco.errors import EXIT_USAGE, NecoError
from neco.serving.config import ServeConfig
from neco.serving.gateway import RequestGateway
from neco.serving.pytriton_compat import (
    ensure_stub_library_path,
    merge_parameters,
    pytriton_model_config,
    pytriton_tensors,
    silence_console,
    tokenless_triton,
    tritonserver_pid,
)
from neco.serving.runtime import ModelLoadError, OnnxFeatureRunner
from neco.serving.supervision import BackendSupervisor, ProcessTree
from neco.triton_config import CONFIG_FILENAME, ONNX_FILENAME, config_problems, contract_from_config, read_model_config

LOGGER = logging.getLogger(__name__)
TRITON_LOG_FILENAME = "tritonserver.log"
"""Triton's log inside its workspace unless `ServeConfig.verbose` (then it goes to stdout)."""
LOG_TAIL_LINES = 20
PORT_KEYS = ("http_port", "grpc_port", "metrics_port")
"""The public ports, in the order `_ports` holds them."""


class PortInUseError(NecoError, OSError):
    """A port the server is configured to bind is taken by another process (exit status 2)."""

    exit_code = EXIT_USAGE


class ServingError(NecoError, RuntimeError):
    """The embedded server could not start, died, or is used before `start()`."""


def pick_free_ports(host: str, count: int) -> list[int]:
    """Ask the OS for `count` distinct free TCP ports (all held open until all are chosen).

    tritonserver cannot report a port it chose itself, so port 0 is resolved here; another
    process could take a port between this call and the server binding it (rare; start fails
    loudly if it happens).
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Fail before Triton starts when a configured port is taken (a second server, another service).

    Otherwise tritonserver fails to bind while PyTriton's readiness check talks to whatever
    listens there (e.g. another PyTriton: a 403 "expecting header 'triton-access-token'").
    SO_REUSEADDR as Triton binds, so a port in TIME_WAIT after a restart is not reported.
    """
    for name, port in ports.items():
        if port == 0:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise PortInUseError(
                    f"port {port} ({name}) on {host} is in use ({exc.strerror}); stop the other server or choose "
                    f"another port ({name}=PORT, 0 = a free one)"
                ) from None


def log_tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of Triton's log file, for an error message ('' when there is none)."""
    if path is None or not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def find_model_version(model_dir: Path, filename: str) -> int:
    """The newest numeric version folder holding `filename` (Triton's default `latest: 1` policy)."""
    versions = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / filename).is_file()]
    if not versions:
        raise ModelLoadError(
            f"{model_dir} has no <version>/{filename}: the embedded server runs ONNX through onnxruntime, "
            f"so export with backend=onnxruntime (TensorRT plans are served by the Docker Triton)"
        )
    return max(versions)


def check_served_signature(config: model_config_pb2.ModelConfig) -> None:
    """The exported config must declare the contract's tensors, batched (dynamic batching needs it)."""
    problems = config_problems(config)
    if problems:
        raise ModelLoadError(f"model config {config.name!r}: " + "; ".join(problems))
    if config.max_batch_size < 1:
        raise ModelLoadError(f"model config {config.name!r}: max_batch_size must be >= 1 for dynamic batching")


def exported_model(repository: Path, model_name: str) -> tuple[model_config_pb2.ModelConfig, int]:
    """The exported config of `model_name` and its newest ONNX version, checked to be servable."""
    model_dir = repository / model_name
    if not (model_dir / CONFIG_FILENAME).is_file():
        available = sorted(p.name for p in repository.iterdir() if (p / CONFIG_FILENAME).is_file())
        if available:
            raise FileNotFoundError(
                f"model {model_name!r} is not in {repository}; it holds {available} (model_name=NAME)"
            )
        raise FileNotFoundError(f"{model_dir}/{CONFIG_FILENAME} not found: is {repository} a model repository?")
    exported = read_model_config(model_dir)
    check_served_signature(exported)
    return exported, find_model_version(model_dir, ONNX_FILENAME)


class EmbeddedServer:
    """Start/stop a PyTriton Triton serving one exported NeCo model; usable as a context manager."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.contract: ModelContract | None = None
        self._triton: Triton | None = None
        self._supervisor: BackendSupervisor | None = None
        self._tree: ProcessTree | None = None
        self._ports: tuple[int, int, int] | None = None
        self._upstream: tuple[int, int] | None = None
        """tritonserver's private loopback HTTP and gRPC ports, behind the gateway."""
        self._gateway: RequestGateway | None = None
        self._launch: Callable[[], None] | None = None
        self._lifecycle = threading.RLock()
        self._failure: str | None = None
        self.backend_failures = 0
        """How many times the python backend died while serving (each answered by a restart or a stop)."""
        self.version: int | None = None
        self.providers: list[str] = []
        self._log_file: Path | None = None

    # --- endpoints ----------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.cfg.model_name

    def _port(self, index: int) -> int:
        if self._ports is None or self._supervisor is None:  # kept while a failed backend is restarted
            raise ServingError("the embedded server is not running; call start() first")
        return self._ports[index]

    @property
    def http_url(self) -> str:
        return f"{self.cfg.host}:{self._port(0)}"

    @property
    def grpc_url(self) -> str:
        return f"{self.cfg.host}:{self._port(1)}"

    @property
    def upstream_urls(self) -> tuple[str, str]:
        """tritonserver's own HTTP and gRPC endpoints behind the gateway (diagnostics and fault tests)."""
        self._port(0)
        http, grpc = self._upstream  # type: ignore[misc]
        return f"127.0.0.1:{http}", f"127.0.0.1:{grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.cfg.host}:{self._port(2)}/metrics"

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> EmbeddedServer:
        """Load the model, start tritonserver, and return once the model is ready to infer."""
        with self._lifecycle:
            if self._triton is not None:
                raise ServingError("the embedded server is already running")
            self._failure = None
            check_ports_free(self.cfg.host, {name: getattr(self.cfg, name) for name in PORT_KEYS})
            exported, version = exported_model(self.cfg.repository, self.cfg.model_name)
            self.contract = contract_from_config(exported)
            onnx_path = self.cfg.repository / self.cfg.model_name / str(version) / ONNX_FILENAME
            runner = OnnxFeatureRunner(
                onnx_path, self.cfg.providers, self.cfg.intra_op_threads, patch_size=self.contract.patch_size
            )
            ports = [getattr(self.cfg, name) for name in PORT_KEYS]
            free = iter(pick_free_ports(self.cfg.host, ports.count(0)))
            self._ports = tuple(port or next(free) for port in ports)  # type: ignore[assignment]
            self._upstream = tuple(pick_free_ports("127.0.0.1", 2))  # type: ignore[assignment]
            self._gateway = RequestGateway(self.cfg.host, self._ports[:2], self._upstream, self.cfg.limits).start()
            self._launch = lambda: self._launch_triton(exported, version, runner)
            self._supervisor = BackendSupervisor(self._on_backend_death)
            try:
                self._launch()
            except BaseException:
                self._supervisor.close()
                self._stop_gateway()
                raise
            self.version, self.providers = version, list(runner.providers)
            LOGGER.debug(
                "serving %s v%d (%s) on http %s, grpc %s, metrics %s with %s",
                self.model_name, version, self.contract.arch, self.http_url, self.grpc_url, self.metrics_url,
                runner.providers,
            )  # fmt: skip
            return self

    def _launch_triton(self, exported: model_config_pb2.ModelConfig, version: int, runner: OnnxFeatureRunner) -> None:
        """Start tritonserver on the chosen ports and put its process tree under supervision."""
        ensure_stub_library_path()
        workspace = Workspace()  # sockets + generated model store; removed by Triton.stop()
        self._log_file = None if self.cfg.verbose else workspace.path / TRITON_LOG_FILENAME
        try:
            uses_gpu = "CUDAExecutionProvider" in runner.providers
            triton = tokenless_triton(self._triton_config(uses_gpu, self._log_file), workspace)
            triton.bind(
                model_name=self.cfg.model_name,
                model_version=version,
                infer_func=runner,
                inputs=pytriton_tensors(exported.input),
                outputs=pytriton_tensors(exported.output),
                config=pytriton_model_config(exported, self.cfg),
                strict=True,
            )
            merge_parameters(workspace.model_store_path / self.cfg.model_name / CONFIG_FILENAME, exported)
        except BaseException:
            workspace.clean()  # nothing started yet, so Triton.stop() would not clean it
            raise
        self._triton = triton
        previous_umask = os.umask(0o077)  # files tritonserver creates (shm regions) are the user's only
        try:
            triton.run()
            if not self.cfg.verbose:
                silence_console(triton)
            self._tree = ProcessTree(tritonserver_pid(triton))
            self._supervisor.watch(self._tree)  # type: ignore[union-attr]
            self._check_served_contract()
            self._gateway.set_available(True)  # type: ignore[union-attr]
        except PyTritonClientTimeoutError as exc:
            tail = log_tail(self._log_file)
            self._shutdown()
            where = f"the end of its log:\n{tail}" if tail else "its log above says why"
            raise ServingError(f"tritonserver did not become ready; {where}") from exc
        except BaseException:
            tail = log_tail(self._log_file)
            self._shutdown()
            if tail:
                LOGGER.error("tritonserver failed to start; the end of its log:\n%s", tail)
            raise
        finally:
            os.umask(previous_umask)

    def stop(self) -> None:
        """Stop tritonserver, end every process it left and remove its shared memory; safe to call twice."""
        with self._lifecycle:
            self._shutdown()
            supervisor, self._supervisor = self._supervisor, None
            if supervisor is not None:
                supervisor.close()
            self._stop_gateway()

    def _stop_gateway(self) -> None:
        gateway, self._gateway = self._gateway, None
        if gateway is not None:
            gateway.stop()

    def _shutdown(self) -> None:
        """Stop tritonserver (if running), then end what it left behind; keeps the supervisor thread."""
        if self._gateway is not None:
            self._gateway.set_available(False)
        triton, self._triton = self._triton, None
        tree, self._tree = self._tree, None
        if self._supervisor is not None:
            self._supervisor.unwatch()
        if triton is not None:
            triton.stop()
        if tree is not None:
            tree.clean_up()

    def _on_backend_death(self, problem: str) -> None:
        """Called by the supervisor: stop the dead server at once, then restart it unless told not to."""
        if not self._lifecycle.acquire(blocking=False):
            return  # start() or stop() is running and decides the server's fate
        try:
            self.backend_failures += 1
            tail = log_tail(self._log_file)
            if tail:
                LOGGER.error("the python backend died (%s); the end of tritonserver's log:\n%s", problem, tail)
            self._shutdown()
            if not self.cfg.restart_on_backend_failure:
                self._failure = f"backend failed ({problem}); restart_on_backend_failure is off"
                return
            LOGGER.warning("restarting tritonserver after a backend failure (%d so far)", self.backend_failures)
            try:
                self._launch()
            except Exception as exc:  # the failure is reported through is_alive() / serve_forever
                self._failure = f"backend failed ({problem}) and the restart failed: {exc}"
                LOGGER.error("%s", self._failure)
        finally:
            self._lifecycle.release()

    def process_ids(self) -> list[int]:
        """Pids of tritonserver and every process seen under it (stub included) since it started."""
        with self._lifecycle:
            tree = self._tree
            if tree is None:
                return []
            tree.refresh()
            return sorted({pid for pid, _ in tree.processes})

    def is_alive(self) -> bool:
        """True while tritonserver runs; False after stop() or a backend failure that was not recovered."""
        with self._lifecycle:
            return self._failure is None and self._triton is not None and self._triton.is_alive()

    def serve_forever(self, on_ready: Callable[[EmbeddedServer], None] | None = None, poll_s: float = 1.0) -> None:
        """Start (if needed) and block until SIGINT/SIGTERM, then stop cleanly; raise if Triton dies.

        The signal handlers are installed before starting, so a signal that arrives while the
        model loads still ends in a clean stop instead of the default abrupt termination.
        """
        stop_requested = threading.Event()

        def _on_signal(signum: int, _frame: FrameType | None) -> None:
            LOGGER.info("received %s, shutting down", signal.Signals(signum).name)
            stop_requested.set()

        previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            if self._triton is None:
                self.start()
            if on_ready is not None:
                on_ready(self)
            while not stop_requested.wait(poll_s):
                if not self.is_alive():
                    raise ServingError(self._failure or "tritonserver or the inference handler exited unexpectedly")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.stop()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # --- helpers --------------------------------------------------------------------------------
    def _triton_config(self, uses_gpu: bool, log_file: Path | None) -> TritonConfig:
        http_port, grpc_port = self._upstream  # type: ignore[misc]
        metrics_port = self._ports[2]  # type: ignore[index]
        return TritonConfig(
            http_address="127.0.0.1",
            http_port=http_port,
            grpc_address="127.0.0.1",
            grpc_port=grpc_port,
            allow_metrics=True,
            allow_gpu_metrics=uses_gpu,
            metrics_address=self.cfg.host,
            metrics_port=metrics_port,
            strict_readiness=True,
            exit_timeout_secs=5,
            log_verbose=self.cfg.log_verbose,
            log_file=log_file,
        )

    def _check_served_contract(self) -> None:
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.upstream_urls[0])
        try:
            served = client.get_model_config(self.model_name)
        finally:
            client.close()
        params = {key: value.get("string_value", "") for key, value in served.get("parameters", {}).items()}
        if ModelContract.from_parameters(params) != self.contract:
            raise ServingError(f"served model config of {self.model_name!r} does not carry the exported contract")
