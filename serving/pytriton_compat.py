"""PyTriton 0.7 compatibility shims: every workaround and every private attribute the embedded server needs.

Kept apart from the server's life cycle (`neco.serving.embedded`) so that a PyTriton upgrade is
checked here, in one file. Each shim closes one gap:

* **libpython of the stub.** The bundled python-backend stub links `libpython3.11.so.1.0`, and
  the dynamic loader picks the system copy unless `LD_LIBRARY_PATH` starts with this
  interpreter's LIBDIR (the model then fails to load with `'_thread.RLock' object has no
  attribute '_recursion_count'`). tritonserver inherits `os.environ` when PyTriton starts it, so
  prepending LIBDIR before the start is enough.
* **No secret on tritonserver's command line.** By default PyTriton generates an access token
  and passes it to tritonserver as `--http-restricted-api=...:triton-access-token=TOKEN`: every
  local user can read it in `/proc/PID/cmdline`, and with it list, unload and load models
  (issue 34). tritonserver 2.51 takes restricted-API keys only from its command line (no
  environment variable, no file), so no key is given at all, and what the key protected is
  closed another way: model control mode `none` (the model store is loaded at start-up and
  every load/unload request is refused, on every port), and the gateway serves only inference,
  health and model metadata on the public ports (`neco.serving.public_routes`). What stays
  reachable on the private loopback ports is listed in docs/reliability.md.
* **Config merging.** The served `config.pbtxt` is the one PyTriton generates from its own
  `ModelConfig`: batching and queue policy are taken from the exported config unless
  `ServeConfig` overrides them. That `ModelConfig` has no `parameters` field, and clients read
  the contract from the served model config, so the exported `parameters` are merged into the
  generated file in PyTriton's local model store at bind time, before tritonserver reads it.
* **Private handles.** tritonserver's pid (for supervision), its console echo (silenced once
  its log goes to a file) and its captured console (for a failed start) have no public accessor.
* **Start without PyTriton's wait.** `Triton.run()` starts tritonserver and then polls its HTTP
  health endpoint for 120 s, even after tritonserver exited (a port taken, a model that does not
  load), and PyTriton's exit callback meanwhile deletes the workspace. The server is started
  alone here, the embedded server watches it bind its ports, and only then calls `connect()`.
* **One warning too many.** PyTriton logs "Triton Inference Server exited with failure. Please
  wait." whenever tritonserver's exit status is not 0, including a stop on purpose whose exit
  timeout ran out; the embedded server reports every exit it did not ask for itself (with the
  end of tritonserver's log), so that line is dropped.
"""

from __future__ import annotations

import logging
import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor, TimeoutAction
from pytriton.triton import Triton, TritonConfig, TritonLifecyclePolicy, TritonSecurityConfig
from pytriton.utils.workspace import Workspace
from tritonclient.grpc import model_config_pb2

from neco.errors import NecoError
from neco.serving.config import DEFAULT_MAX_QUEUE_SIZE, DEFAULT_REQUEST_TIMEOUT_MS, ServeConfig
from neco.signature import SPECS


class UnsupportedPyTritonError(NecoError, RuntimeError):
    """The installed PyTriton lacks something a shim relies on (a private attribute, a generated file)."""


def ensure_stub_library_path() -> str:
    """Make `LD_LIBRARY_PATH` start with this interpreter's LIBDIR (see the module docstring)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir:
        raise UnsupportedPyTritonError("this Python reports no LIBDIR; the python-backend stub cannot find libpython")
    entries = [e for e in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if e]
    if not entries or entries[0] != libdir:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *(e for e in entries if e != libdir)])
    return os.environ["LD_LIBRARY_PATH"]


def tokenless_triton(config: TritonConfig, workspace: Workspace) -> Triton:
    """A Triton whose command line carries no access token and whose models cannot be loaded or unloaded.

    PyTriton always asks for explicit model control and `--load-model=*`; with the local model
    store nothing of PyTriton calls the repository API afterwards, so mode `none` (load the store
    at start-up, refuse every later change) serves the same model.
    """
    triton = Triton(
        config=config,
        workspace=workspace,
        triton_lifecycle_policy=TritonLifecyclePolicy(launch_triton_on_startup=True, local_model_store=True),
        security_config=TritonSecurityConfig(restricted_endpoints=[]),
    )
    try:
        arguments = triton._triton_server_config  # noqa: SLF001  (PyTriton 0.7: no public switch)
    except AttributeError as exc:
        raise UnsupportedPyTritonError("cannot set tritonserver's model control mode in this PyTriton") from exc
    arguments["model-control-mode"] = "none"
    arguments["load-model"] = None  # only valid with explicit control; `none` loads the whole store
    return triton


def pytriton_tensors(specs: Sequence[model_config_pb2.ModelInput | model_config_pb2.ModelOutput]) -> list[Tensor]:
    """PyTriton's tensor declarations for the exported config's inputs or outputs."""
    return [Tensor(name=s.name, dtype=np.dtype(SPECS[s.name].dtype).type, shape=tuple(s.dims)) for s in specs]


def pytriton_model_config(exported: model_config_pb2.ModelConfig, cfg: ServeConfig) -> ModelConfig:
    """Batching and queue policy from config.pbtxt unless overridden; the queue is always bounded.

    Preferred sizes above an overridden `max_batch_size` are dropped (Triton refuses to
    load such a config, and would only report it after its 120 s readiness wait).
    """
    batching = exported.dynamic_batching
    max_batch = cfg.max_batch_size or exported.max_batch_size
    preferred = cfg.preferred_batch_sizes
    if preferred is None:
        preferred = [size for size in batching.preferred_batch_size if size <= max_batch]
    elif max(preferred, default=0) > max_batch:
        raise ValueError(f"preferred_batch_sizes {preferred} exceed max_batch_size {max_batch}")
    delay = cfg.max_queue_delay_us
    policy = batching.default_queue_policy
    queue_size = cfg.max_queue_size or policy.max_queue_size or DEFAULT_MAX_QUEUE_SIZE
    timeout_us = (
        cfg.request_timeout_ms * 1000
        if cfg.request_timeout_ms
        else policy.default_timeout_microseconds or DEFAULT_REQUEST_TIMEOUT_MS * 1000
    )
    return ModelConfig(
        batching=True,
        max_batch_size=max_batch,
        batcher=DynamicBatcher(
            preferred_batch_size=preferred,
            max_queue_delay_microseconds=batching.max_queue_delay_microseconds if delay is None else delay,
            default_queue_policy=QueuePolicy(
                timeout_action=TimeoutAction.REJECT,
                default_timeout_microseconds=timeout_us,
                allow_timeout_override=True,
                max_queue_size=queue_size,
            ),
        ),
    )


def merge_parameters(generated_path: Path, exported: model_config_pb2.ModelConfig) -> None:
    """Copy the exported `parameters` into PyTriton's generated config (see the module docstring)."""
    if not generated_path.is_file():
        raise UnsupportedPyTritonError(f"PyTriton did not write {generated_path}; unsupported PyTriton version?")
    generated = text_format.Parse(generated_path.read_text(), model_config_pb2.ModelConfig())
    clash = sorted(set(generated.parameters) & set(exported.parameters))
    if clash:
        raise UnsupportedPyTritonError(f"exported parameters {clash} collide with PyTriton's own backend parameters")
    for key, value in exported.parameters.items():
        generated.parameters[key].CopyFrom(value)
    generated_path.write_text(text_format.MessageToString(generated))


def tritonserver_pid(triton: Triton) -> int:
    """The pid of the tritonserver process PyTriton started."""
    try:
        return int(triton._triton_server._tritonserver_running_cmd.pid)  # noqa: SLF001
    except AttributeError as exc:
        raise UnsupportedPyTritonError("cannot find tritonserver's pid in this PyTriton version") from exc


def start_tritonserver(triton: Triton) -> None:
    """Start tritonserver without PyTriton's readiness wait (see the module docstring); `connect()` follows."""
    try:
        triton._run_server()  # noqa: SLF001  (PyTriton 0.7: `run()` = `_run_server()` + `connect()`)
    except AttributeError as exc:
        raise UnsupportedPyTritonError("cannot start tritonserver apart from connecting in this PyTriton") from exc


def tritonserver_console(triton: Triton) -> str:
    """What tritonserver printed on its console (all of its log when it has no log file)."""
    return str(triton._triton_server.logs())  # noqa: SLF001


class _NoExitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "exited with failure" not in record.getMessage()


def drop_exit_warning() -> None:
    """Drop PyTriton's "exited with failure" line (see the module docstring); idempotent."""
    logger = logging.getLogger("pytriton.server.triton_server")
    if not any(isinstance(f, _NoExitWarning) for f in logger.filters):
        logger.addFilter(_NoExitWarning())


def silence_console(triton: Triton) -> None:
    """Stop echoing what tritonserver still prints after its log file took over (e.g. on SIGINT)."""
    triton._triton_server._verbose = False  # noqa: SLF001
