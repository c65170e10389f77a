"""The gateway's header-only request check (`neco.serving.request_check`), without a server."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from neco.serving.request_check import RequestRefused, grpc_inputs, http_inputs, request_problem
from neco.signature import InputLimits

LIMITS = InputLimits(max_side=224, max_image_pixels=168 * 168, max_request_pixels=2 * 112 * 112, max_batch=4)
BUDGET = 2 * 112 * 112 * 3


def binary_body(inputs: list[tuple[str, str, list[int], int]]) -> tuple[bytes, str]:
    header = json.dumps(
        {
            "inputs": [
                {"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": b}} for n, d, s, b in inputs
            ]
        }
    ).encode()
    return header + bytes(sum(b for *_, b in inputs)), str(len(header))


def problem_of_binary(inputs: list[tuple[str, str, list[int], int]]) -> str | None:
    body, split = binary_body(inputs)
    try:
        return request_problem(http_inputs(body, split, LIMITS))
    except RequestRefused as exc:
        return str(exc)


@given(
    dims=st.lists(st.integers(min_value=0, max_value=2**63 - 1), min_size=1, max_size=4),
    itemsize=st.sampled_from([("UINT8", 1), ("FP16", 2), ("FP32", 4), ("INT64", 8)]),
)
def test_any_other_input_is_refused_exactly_when_it_declares_more_than_a_request_may_carry(dims, itemsize):
    """Independent arithmetic: Python's exact product, compared with the byte budget."""
    datatype, size = itemsize
    declared = size
    for d in dims:
        declared *= d
    carried = declared if declared <= BUDGET else 0
    problem = problem_of_binary([("other", datatype, dims, carried)])
    assert (problem is not None) == (declared > BUDGET), (dims, problem)


def test_int64_overflowing_shapes_are_refused():
    huge = 14 * 2**58  # 8 x huge x huge x 3 is 0 modulo 2^64, so a wrapping check would pass it
    assert (8 * huge * huge * 3) % 2**64 == 0
    assert "exceeds max_side=224" in problem_of_binary([("images", "UINT8", [8, huge, huge, 3], 0)])
    assert "declares" in problem_of_binary([("other", "UINT8", [8, huge, huge, 3], 0)])


@pytest.mark.parametrize(
    "inputs,fragment",
    [
        ([("images", "UINT8", [1, 28, 28, 3], 100)], "needs 2352 bytes, the request carries 100"),
        ([("images", "UINT8", [1, 28, 28, 3], 2352)], None),
        ([("images", "UINT8", [1, 28, 28], 2352)], "shape must be [batch, height, width, 3]"),
        ([("images", "UINT8", [1, -1, 28, 3], 0)], "negative dimension in shape [1, -1, 28, 3]"),
        ([("other", "UINT8", [-1, 3], 0)], "negative dimension"),
    ],
)
def test_binary_requests(inputs, fragment):
    problem = problem_of_binary(inputs)
    assert problem is None if fragment is None else fragment in problem, problem


def test_binary_total_must_match_the_body():
    body, split = binary_body([("images", "UINT8", [1, 28, 28, 3], 2352)])
    with pytest.raises(RequestRefused, match="declare 2352 bytes of binary data, the body carries 2351"):
        http_inputs(body[:-1], split, LIMITS)


def test_json_element_count_is_checked_after_the_shape():
    body = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 14, 14, 3], "data": [[1, 2]]}]})
    problem = request_problem(http_inputs(body.encode(), None, LIMITS))
    assert "needs 588 elements, the request carries 2" in problem
    huge = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 59990, 59990, 3], "data": [1]}]})
    with pytest.raises(RequestRefused, match="exceeds max_side=224"):
        http_inputs(huge.encode(), None, LIMITS)


@pytest.mark.parametrize(
    "body,split,fragment",
    [
        (b"{not json", None, "malformed inference request header"),
        (b"[]", None, "JSON object with an 'inputs' list"),
        (b'{"inputs": [{"name": "images"}]}', None, "must be an object with a 'shape' list"),
        (b'{"inputs": [{"name": "x", "shape": [1.5]}]}', None, "must be an integer"),
        (b"{}", "abc", "must be an integer"),
        (b"{}", "99", "outside the 2-byte body"),
    ],
)
def test_malformed_http_headers_are_refused(body, split, fragment):
    with pytest.raises(RequestRefused, match=fragment.replace("[", r"\[").replace("(", r"\(")):
        http_inputs(body, split, LIMITS)


def test_grpc_inputs_carry_raw_or_typed_sizes():
    request = service_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="images", datatype="UINT8").shape.extend([1, 28, 28, 3])
    request.raw_input_contents.append(bytes(7))
    assert "needs 2352 bytes, the request carries 7" in request_problem(grpc_inputs(request, LIMITS))
    typed = service_pb2.ModelInferRequest(model_name="m")
    tensor = typed.inputs.add(name="images", datatype="UINT8")
    tensor.shape.extend([1, 14, 14, 3])
    tensor.contents.uint_contents.extend(range(588))
    assert request_problem(grpc_inputs(typed, LIMITS)) is None
    tensor.contents.uint_contents.append(0)
    assert "needs 588 elements, the request carries 589" in request_problem(grpc_inputs(typed, LIMITS))
    mixed = service_pb2.ModelInferRequest(model_name="m")
    mixed.inputs.add(name="a", datatype="UINT8").shape.append(1)
    mixed.inputs.add(name="b", datatype="UINT8").shape.append(1)
    mixed.raw_input_contents.append(b"x")
    with pytest.raises(RequestRefused, match="2 inputs but 1 raw_input_contents"):
        grpc_inputs(mixed, LIMITS)


def test_grpc_declarations_are_refused_while_parsing():
    huge = service_pb2.ModelInferRequest(model_name="m")
    huge.inputs.add(name="images", datatype="UINT8").shape.extend([1, 59990, 59990, 3])
    with pytest.raises(RequestRefused, match="exceeds max_side=224"):
        grpc_inputs(huge, LIMITS)
    other = service_pb2.ModelInferRequest(model_name="m")
    other.inputs.add(name="other", datatype="FP32").shape.extend([BUDGET])
    with pytest.raises(RequestRefused, match=f"declares {4 * BUDGET} bytes"):
        grpc_inputs(other, LIMITS)


@pytest.mark.parametrize(
    "header,key",
    [
        (b'{"inputs": [{"name": "images", "shape": [8, 1, 1, 3], "shape": [1, 14, 14, 3]}]}', "shape"),
        (b'{"inputs": [{"name": "images", "sh\\u0061pe": [8, 1, 1, 3], "shape": [1, 14, 14, 3]}]}', "shape"),
        (b'{"inputs": [], "inputs": [{"name": "images", "shape": [1, 14, 14, 3]}]}', "inputs"),
        (b'{"inputs": [{"name": "x", "shape": [1], "parameters": {"binary_data_size": 1, "binary_data_size": 9}}]}',
         "binary_data_size"),
    ],
)  # fmt: skip
def test_a_key_repeated_in_any_object_is_refused(header, key):
    """Python's json keeps the last of a repeated key, Triton the first: the request is ambiguous."""
    with pytest.raises(RequestRefused, match=f"repeats the key '{key}'"):
        http_inputs(header, None, LIMITS)


def test_json_nested_beyond_the_parser_limit_is_refused_not_an_error():
    deep = b"[" * 100_000 + b"]" * 100_000
    for body in (deep, b'{"inputs": ' + deep + b"}"):
        with pytest.raises(RequestRefused, match="nested too deeply"):
            http_inputs(body, None, LIMITS)


@pytest.mark.parametrize("split", ["+2", " 2", "2_0", "²", "-0"])
def test_header_length_is_plain_decimal_digits(split):
    """int() takes these; Triton's header-length parsing does not read them the same way."""
    with pytest.raises(RequestRefused, match="must be an integer"):
        http_inputs(b"{}" + bytes(20), split, LIMITS)


def test_header_must_be_utf8():
    """Python's json also reads UTF-16 and UTF-32, Triton's parser only UTF-8."""
    with pytest.raises(RequestRefused, match="malformed inference request header"):
        http_inputs('{"inputs": []}'.encode("utf-16"), None, LIMITS)


def test_nested_json_data_is_counted_element_by_element():
    data = [[1, 2], [3, [4, 5]], 6, [[[]]], []]
    body = json.dumps({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [6], "data": data}]}).encode()
    assert request_problem(http_inputs(body, None, LIMITS)) is None
    body = json.dumps({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [5], "data": data}]}).encode()
    assert "needs 5 elements, the request carries 6" in request_problem(http_inputs(body, None, LIMITS))
