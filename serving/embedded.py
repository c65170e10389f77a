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
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType

from pytriton.triton import Triton, TritonConfig
from pytriton.utils.workspace import Workspace
from tritonclient.grpc import model_config_pb2

from neco.contract import ModelContract
from neco.errors import NecoError
from neco.serving.config import ServeConfig
from neco.serving.gateway import RequestGateway
from neco.serving.ports import check_ports_free, pick_free_ports
from neco.serving.pytriton_compat import (
    drop_exit_warning,
    ensure_stub_library_path,
    merge_parameters,
    pytriton_model_config,
    pytriton_tensors,
    silence_console,
    start_tritonserver,
    tokenless_triton,
    tritonserver_console,
    tritonserver_pid,
)
from neco.serving.repository import exported_model
from neco.serving.runtime import OnnxFeatureRunner
from neco.serving.supervision import (
    BackendSupervisor,
    ProcessTree,
    likely_cause,
    log_tail,
    tail_lines,
    taken_port,
    wait_until_listening,
)
from neco.triton_config import CONFIG_FILENAME, ONNX_FILENAME, contract_from_config

LOGGER = logging.getLogger(__name__)
TRITON_LOG_FILENAME = "tritonserver.log"
"""Triton's log, in a folder of its own (PyTriton deletes its workspace when tritonserver exits), unless
`ServeConfig.verbose` (then it goes to stdout)."""
PORT_KEYS = ("http_port", "grpc_port", "metrics_port")
"""The public ports, in the order `_ports` holds them."""
START_ATTEMPTS = 3
"""Starts on newly chosen ports when another process took a chosen one first (see `pick_free_ports`)."""


class ServingError(NecoError, RuntimeError):
    """The embedded server could not start, died, or is used before `start()`."""


class ChosenPortTakenError(ServingError):
    """A port chosen for tritonserver was taken by another process before it bound it (started again)."""


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
        self._log_dir: Path | None = None
        self._log_file: Path | None = None
        drop_exit_warning()

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
            self._launch = lambda: self._launch_triton(exported, version, runner)
            self._supervisor = BackendSupervisor(self._on_backend_death)
            try:
                self._start_on_free_ports()
            except BaseException:
                self._shutdown()
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

    def _start_on_free_ports(self) -> None:
        """Choose the ports for 0, start tritonserver, then the gateway; again on new ports if one was taken.

        tritonserver starts first: gRPC prints a fork_posix.cc line for a fork made while its threads run.
        """
        for attempt in range(1, START_ATTEMPTS + 1):
            ports = [getattr(self.cfg, name) for name in PORT_KEYS]
            free = iter(pick_free_ports(self.cfg.host, ports.count(0)))
            self._ports = tuple(port or next(free) for port in ports)  # type: ignore[assignment]
            self._upstream = tuple(pick_free_ports("127.0.0.1", 2, exclude=self._ports))  # type: ignore[assignment]
            self._gateway = RequestGateway(
                self.cfg.host,
                self._ports[:2],
                self._upstream,
                self.cfg.limits,
                bodies=self.cfg.bodies,
                patch_size=self.contract.patch_size,
            )
            try:
                self._launch()  # type: ignore[misc]
            except ChosenPortTakenError as exc:
                if attempt == START_ATTEMPTS:
                    raise
                LOGGER.warning("%s; starting again on other ports", str(exc).splitlines()[0])
                continue
            self._gateway.start()
            return

    def _launch_triton(self, exported: model_config_pb2.ModelConfig, version: int, runner: OnnxFeatureRunner) -> None:
        """Start tritonserver on the chosen ports and put its process tree under supervision."""
        ensure_stub_library_path()
        workspace = Workspace()  # sockets + generated model store; removed by Triton.stop()
        self._log_dir = None if self.cfg.verbose else Path(tempfile.mkdtemp(prefix="neco-tritonserver-"))
        self._log_file = None if self._log_dir is None else self._log_dir / TRITON_LOG_FILENAME
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
            self._remove_log()
            raise
        self._triton = triton
        previous_umask = os.umask(0o077)  # files tritonserver creates (shm regions) are the user's only
        try:
            start_tritonserver(triton)
            if not self.cfg.verbose:
                silence_console(triton)
            self._wait_until_bound(triton)
            triton.connect()  # tritonserver is up: PyTriton's readiness checks pass at once
            self._tree = ProcessTree(tritonserver_pid(triton))
            self._supervisor.watch(self._tree)  # type: ignore[union-attr]
            self._check_served_contract()
            self._gateway.set_available(True)  # type: ignore[union-attr]
        except ServingError:
            self._shutdown()  # the error carries the end of tritonserver's log already
            raise
        except BaseException:
            tail = self._triton_log_tail()
            self._shutdown()
            if tail:
                LOGGER.error("tritonserver failed to start; the end of its log:\n%s", tail)
            raise
        finally:
            os.umask(previous_umask)

    def _wait_until_bound(self, triton: Triton) -> None:
        """Return once tritonserver listens on its three ports; a `ServingError` saying why if it exits first."""
        http, grpc = self._upstream  # type: ignore[misc]
        configured = self.cfg.metrics_port != 0
        ports = {
            http: "tritonserver's private HTTP port, chosen at start",
            grpc: "tritonserver's private gRPC port, chosen at start",
            self._ports[2]: "metrics_port" if configured else "metrics_port=0, chosen at start",  # type: ignore[index]
        }
        problem = wait_until_listening(tritonserver_pid(triton), ports)
        if problem is None:
            return
        tail = self._triton_log_tail()
        where = f"the end of tritonserver's log:\n{tail}" if tail else "tritonserver wrote no log"
        chosen = "chosen at start" in ports.get(taken_port(tail) or -1, "")
        raise (ChosenPortTakenError if chosen else ServingError)(f"{problem}: {likely_cause(tail, ports)}\n{where}")

    def _triton_log_tail(self) -> str:
        """The end of tritonserver's log file, else of what it printed on its console."""
        tail = log_tail(self._log_file)
        if not tail and self._triton is not None:
            tail = tail_lines(tritonserver_console(self._triton))
        return tail

    def _remove_log(self) -> None:
        log_dir, self._log_dir = self._log_dir, None
        if log_dir is not None:
            shutil.rmtree(log_dir, ignore_errors=True)

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
        self._remove_log()

    def _on_backend_death(self, problem: str) -> None:
        """Called by the supervisor: stop the dead server at once, then restart it unless told not to."""
        if not self._lifecycle.acquire(blocking=False):
            return  # start() or stop() is running and decides the server's fate
        try:
            self.backend_failures += 1
            tail = self._triton_log_tail()
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
