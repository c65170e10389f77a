"""What an inference request declares, read from its header alone, and why it may be refused.

Why a separate check before Triton: Triton 2.51 allocates a request's declared tensors before
any model code runs. A JSON body declaring `[1, 60000, 60000, 3]` makes its HTTP frontend
allocate 10.8 GB; a shape whose byte count overflows int64 (`8 x 2^62 x 2^62 x 3` wraps to 0)
passes Triton's own size check and kills the python-backend stub. Python's integers do not
overflow, so every product here is exact. The rules: dimensions are non-negative, no input
declares more bytes than a whole request may carry, `images` obeys `check_image_shape` and the
`InputLimits`, and the bytes (or JSON elements) received match the declared shape x dtype.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from tritonclient.grpc import service_pb2

from neco.contract import INPUT_IMAGES
from neco.errors import InputError
from neco.signature import TRITON_DTYPE_BYTES, InputLimits, check_image_shape

HEADER_ALLOWANCE = 1 << 20
"""Bytes a request header (JSON or protobuf fields other than the tensor data) may add."""
JSON_CHARS_PER_ELEMENT = 5
"""Widest JSON text of one uint8 element ("255, "): bounds a JSON request body."""


class RequestRefused(InputError):
    """An inference request the gateway answers itself (HTTP 400 / gRPC INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class DeclaredInput:
    """One input tensor as the request header declares it, and how much data came with it."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    nbytes: int | None = None
    """Bytes received for it (binary data, raw gRPC contents, shared-memory size); None if unknown."""
    count: int | None = None
    """Elements received for it (JSON `data`, typed gRPC contents); None if unknown."""


def request_byte_budget(limits: InputLimits) -> int:
    """The most tensor bytes one request may carry: a full batch of uint8 RGB pixels."""
    return limits.max_request_pixels * 3


def declaration_problem(
    name: str, datatype: str, shape: tuple[int, ...], limits: InputLimits, patch_size: int | None = None
) -> str | None:
    """Why a declared input is refused before any of its data is looked at, or None.

    Both parsers call this as soon as they read a declaration, so what they count afterwards
    (JSON elements) is bounded by the limits.
    """
    dims = list(shape)
    if any(d < 0 for d in dims):
        return f"input {name!r}: negative dimension in shape {dims}"
    if name == INPUT_IMAGES:
        try:
            check_image_shape(dims, limits, patch_size=patch_size)
        except InputError as exc:
            return str(exc)
    declared = math.prod(dims) * TRITON_DTYPE_BYTES.get(datatype, 1)
    budget = request_byte_budget(limits)
    if declared > budget:
        return (
            f"input {name!r}: shape {dims} ({datatype}) declares {declared} bytes, above the "
            f"{budget} a request may carry (max_request_pixels={limits.max_request_pixels})"
        )
    return None


def data_problem(tensor: DeclaredInput) -> str | None:
    """Why the data received for an (already accepted) declaration does not match it, or None."""
    shape = list(tensor.shape)
    elements = math.prod(shape)
    declared = elements * TRITON_DTYPE_BYTES.get(tensor.datatype, 1)
    if tensor.nbytes is not None and tensor.datatype in TRITON_DTYPE_BYTES and tensor.nbytes != declared:
        return (
            f"input byte size mismatch for input {tensor.name!r}: shape {shape} ({tensor.datatype}) needs "
            f"{declared} bytes, the request carries {tensor.nbytes}"
        )
    if tensor.count is not None and tensor.count != elements:
        return (
            f"input element count mismatch for input {tensor.name!r}: shape {shape} needs {elements} "
            f"elements, the request carries {tensor.count}"
        )
    return None


def request_problem(inputs: Sequence[DeclaredInput]) -> str | None:
    """The first input whose data does not match its declaration, else None.

    `inputs` come from `http_inputs` / `grpc_inputs`, which already refused bad declarations.
    """
    for tensor in inputs:
        problem = data_problem(tensor)
        if problem is not None:
            return problem
    return None


def _checked(name: str, datatype: str, shape: tuple[int, ...], limits: InputLimits, patch_size: int | None) -> None:
    problem = declaration_problem(name, datatype, shape, limits, patch_size)
    if problem is not None:
        raise RequestRefused(problem)


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestRefused(f"{what} must be an integer, got {value!r}")
    return value


def _count_leaves(data: object) -> int:
    """Elements of a (possibly nested) JSON array, without recursion.

    A flat list is counted by its length after one C-level pass over its element types: a
    maximum-size body holds some 25 million elements, and a Python loop over them took seconds.
    """
    count, stack = 0, [data]
    while stack:
        item = stack.pop()
        if not isinstance(item, list):
            count += 1
        elif list in map(type, item):
            stack.extend(item)
        else:
            count += len(item)
    return count


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """`object_pairs_hook` refusing a key that appears twice in one JSON object.

    Python's json keeps the last value of a repeated key and Triton's parser the first, so a
    body with two `shape`s would be checked with one and run with the other.
    """
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise RequestRefused(f"inference request header repeats the key {repeated[:64]!r} in one object")
    return document


def parse_header(header: bytes | bytearray) -> object:
    """The JSON inference header, read only the way Triton reads it too, else RequestRefused.

    Strict UTF-8 (Python's json would also accept UTF-16/32), no repeated keys, and nesting
    beyond the parser's recursion limit is a refusal rather than an internal error.
    """
    try:
        return json.loads(header.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestRefused(f"malformed inference request header: {exc}") from None
    except RecursionError:
        raise RequestRefused("inference request header is nested too deeply") from None


def header_size(body_length: int, header_length: str | None) -> int:
    """Bytes of JSON a body's header holds (the whole body unless a valid header length splits it)."""
    if header_length is not None and header_length.isascii() and header_length.isdigit():
        return min(int(header_length), body_length)
    return body_length


def http_inputs(
    body: bytes | bytearray, header_length: str | None, limits: InputLimits, patch_size: int | None = None
) -> list[DeclaredInput]:
    """The inputs of a KServe v2 HTTP infer body (JSON, or JSON header + binary tensors).

    Element counts of JSON `data` are taken only after the declared shapes passed the limits,
    so counting is bounded by the limits too.
    """
    if header_length is None:
        header, binary = body, b""
    else:
        if not (header_length.isascii() and header_length.isdigit()):  # int() would also take "+1", " 1", "1_0"
            raise RequestRefused(f"Inference-Header-Content-Length must be an integer, got {header_length[:32]!r}")
        split = int(header_length)
        if not 0 <= split <= len(body):
            raise RequestRefused(f"Inference-Header-Content-Length {split} is outside the {len(body)}-byte body")
        header, binary = body[:split], body[split:]
    document = parse_header(header)
    raw_inputs = document.get("inputs") if isinstance(document, dict) else None
    if not isinstance(raw_inputs, list):
        raise RequestRefused("inference request header must be a JSON object with an 'inputs' list")
    declared, binary_total = [], 0
    for index, raw in enumerate(raw_inputs):
        if not isinstance(raw, dict) or not isinstance(raw.get("shape"), list):
            raise RequestRefused(f"input {index} must be an object with a 'shape' list")
        name, datatype = str(raw.get("name", "")), str(raw.get("datatype", ""))
        shape = tuple(_int(d, f"input {name!r} shape dimension") for d in raw["shape"])
        params = raw.get("parameters") or {}
        if not isinstance(params, dict):
            raise RequestRefused(f"input {name!r}: 'parameters' must be an object")
        _checked(name, datatype, shape, limits, patch_size)
        tensor = DeclaredInput(name, datatype, shape)
        if "binary_data_size" in params:
            size = _int(params["binary_data_size"], f"input {name!r} binary_data_size")
            binary_total += size
            tensor = DeclaredInput(name, datatype, shape, nbytes=size)
        elif "shared_memory_region" in params:
            size = _int(params.get("shared_memory_byte_size"), f"input {name!r} shared_memory_byte_size")
            tensor = DeclaredInput(name, datatype, shape, nbytes=size)
        elif "data" in raw:
            tensor = DeclaredInput(name, datatype, shape, count=_count_leaves(raw["data"]))
        declared.append(tensor)
    if binary_total != len(binary):
        raise RequestRefused(f"inputs declare {binary_total} bytes of binary data, the body carries {len(binary)}")
    return declared


_CONTENT_FIELDS = (
    "bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
    "fp32_contents", "fp64_contents", "bytes_contents",
)  # fmt: skip


def grpc_inputs(
    request: service_pb2.ModelInferRequest, limits: InputLimits, patch_size: int | None = None
) -> list[DeclaredInput]:
    """The inputs of a gRPC ModelInferRequest, with the size of the data each one carries."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise RequestRefused(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents")
    declared = []
    for index, tensor in enumerate(request.inputs):
        shape = tuple(int(d) for d in tensor.shape)
        _checked(tensor.name, tensor.datatype, shape, limits, patch_size)
        nbytes = count = None
        if raw:
            nbytes = len(raw[index])
        elif "shared_memory_region" in tensor.parameters:
            nbytes = int(tensor.parameters["shared_memory_byte_size"].int64_param)
        else:
            count = sum(len(getattr(tensor.contents, field)) for field in _CONTENT_FIELDS)
        declared.append(DeclaredInput(tensor.name, tensor.datatype, shape, nbytes=nbytes, count=count))
    return declared
