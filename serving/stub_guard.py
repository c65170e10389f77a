"""Request validation inside Triton's python-backend stub, before PyTriton touches the data.

Why here: PyTriton's proxy model turns every error of the inference callable into one
`TritonModelException` for the whole batch, which Triton reports as INTERNAL (HTTP 500) with
a traceback naming server paths. Validating in the stub, per request, lets a bad request be
answered with Triton's INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT) and a one-line message,
while the other requests of the same dynamic batch are served normally. It also runs before
PyTriton copies the images into its tensor store and ships them to the inference thread, so
a request above the configured `InputLimits` costs no copy and no model run.

The embedded server renames PyTriton's generated `model.py` to `pytriton_model.py` and writes
`STUB_MODEL_SOURCE` as `model.py`: the stub then loads PyTriton's proxy wrapped by
`guarded_model`. The limits reach the stub through the model config parameter
`LIMITS_PARAMETER`. `triton_python_backend_utils` exists only inside the stub, hence the
lazy import.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from neco.contract import INPUT_IMAGES
from neco.errors import InputError
from neco.signature import DEFAULT_LIMITS, InputLimits, check_image_shape

LIMITS_PARAMETER = "serving_input_limits"
"""Model-config parameter holding the server's `InputLimits` as JSON."""
PYTRITON_MODEL_MODULE = "pytriton_model"
"""Name PyTriton's generated proxy `model.py` is given in the model store."""
STUB_MODEL_SOURCE = f'''"""Written by neco.serving.embedded: PyTriton's proxy model behind neco's request guard."""

from neco.serving.stub_guard import guarded_model

from .{PYTRITON_MODEL_MODULE} import TritonPythonModel as _PyTritonModel

TritonPythonModel = guarded_model(_PyTritonModel)
'''


def limits_from_model_config(model_config: dict[str, Any]) -> InputLimits:
    """The limits the embedded server put into the model config (defaults if absent)."""
    raw = model_config.get("parameters", {}).get(LIMITS_PARAMETER, {}).get("string_value")
    return InputLimits.model_validate_json(raw) if raw else DEFAULT_LIMITS


def request_problem(shape: Sequence[int] | None, limits: InputLimits) -> str | None:
    """One line saying why a request with this `images` shape is refused, or None if it is fine."""
    if shape is None:
        return f"request has no {INPUT_IMAGES!r} input"
    try:
        check_image_shape(shape, limits)
    except InputError as exc:
        return str(exc)
    return None


def answer_batch(
    problems: Sequence[str | None],
    run_good: Callable[[list[int]], list[Any]],
    error_response: Callable[[str], Any],
) -> list[Any]:
    """Responses in request order: an error for each refused request, `run_good` for the rest.

    `run_good` receives the indices of the accepted requests and returns their responses in
    that order; it is not called when every request was refused.
    """
    good = [i for i, problem in enumerate(problems) if problem is None]
    served = iter(run_good(good) if good else [])
    return [next(served) if problem is None else error_response(problem) for problem in problems]


def guarded_model(proxy_class: type) -> type:
    """Subclass PyTriton's proxy model so that every request is checked before it is forwarded."""
    import triton_python_backend_utils as pb_utils  # only importable inside the stub

    def invalid(message: str) -> Any:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))

    class GuardedModel(proxy_class):  # type: ignore[misc, valid-type]
        def initialize(self, args: dict[str, str]) -> None:
            self._neco_limits = limits_from_model_config(json.loads(args["model_config"]))
            super().initialize(args)

        def execute(self, requests: list[Any]) -> list[Any]:
            problems = []
            for request in requests:
                tensor = pb_utils.get_input_tensor_by_name(request, INPUT_IMAGES)
                problems.append(request_problem(None if tensor is None else tensor.shape(), self._neco_limits))
            return answer_batch(
                problems, lambda good: super(GuardedModel, self).execute([requests[i] for i in good]), invalid
            )

    GuardedModel.__name__ = GuardedModel.__qualname__ = "TritonPythonModel"
    return GuardedModel
