"""The Open Inference Protocol (KServe v2, as Triton and MLServer speak it)
over HTTP/REST: an infer request's body into arrays, arrays into a response
body, with JSON tensors and Triton's binary-tensor extension.

Binary extension: the body is a JSON header of `Inference-Header-Content-Length`
bytes followed by the raw (row-major, little-endian) bytes of each input that
declares `parameters.binary_data_size`, in input order; outputs come back the
same way when the request asks for `binary_data` (per output) or
`binary_data_output` (for all). Everything here is pure and raises
ProtocolError, which the server answers with its HTTP status.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

HEADER_LENGTH = "inference-header-content-length"

DATATYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16,
             "UINT32": np.uint32, "UINT64": np.uint64, "INT8": np.int8,
             "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
             "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
DATATYPE_OF = {np.dtype(v): k for k, v in DATATYPES.items()}


class ProtocolError(Exception):
  """A request the server cannot take; `.status` is the HTTP status."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass(frozen=True)
class Signature:
  """One input and one output tensor, each with a leading batch dimension
  (-1 in metadata) before `input_shape` / `output_shape`."""
  input_name: str
  input_shape: tuple[int, ...]
  input_datatype: str
  output_name: str
  output_shape: tuple[int, ...]
  output_datatype: str

  def metadata(self, name: str, version: str, platform: str) -> dict:
    return {"name": name, "versions": [version], "platform": platform,
            "inputs": [{"name": self.input_name,
                        "datatype": self.input_datatype,
                        "shape": [-1, *self.input_shape]}],
            "outputs": [{"name": self.output_name,
                         "datatype": self.output_datatype,
                         "shape": [-1, *self.output_shape]}]}


@dataclasses.dataclass
class InferRequest:
  inputs: np.ndarray
  id: str | None
  binary_output: bool
  parameters: dict


def _header(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
  if header_length is None:
    size = len(body)
  else:
    try:
      size = int(header_length)
    except ValueError:
      size = -1
    if not 0 <= size <= len(body):
      raise ProtocolError(f"Inference-Header-Content-Length {header_length!r}"
                          f" is not a length within the {len(body)}-byte body")
  return load_object(body[:size], "'inputs'"), body[size:]


def load_object(body: bytes, holding: str) -> dict:
  """A request's JSON object, or a ProtocolError (400) saying why not:
  invalid JSON, nesting deeper than the parser goes, or not an object (the
  message says it must hold `holding`)."""
  try:
    loaded = json.loads(body)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ProtocolError(f"the request is not valid JSON: {e}") from None
  except RecursionError:
    raise ProtocolError("the request's JSON nests deeper than the parser "
                        "goes") from None
  if not isinstance(loaded, dict):
    raise ProtocolError(f"the request must be a JSON object with {holding}")
  return loaded


def _shape(tensor: dict, signature: Signature, max_rows: int) -> tuple:
  shape = tensor.get("shape")
  if (not isinstance(shape, list)
      or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
    raise ProtocolError(f"input {signature.input_name!r}: 'shape' must be a "
                        "list of integers")
  if tuple(shape[1:]) != signature.input_shape or len(shape) < 1:
    raise ProtocolError(f"input {signature.input_name!r} of shape {shape}: "
                        f"the model takes [N, {', '.join(map(str, signature.input_shape))}]")
  if not 1 <= shape[0] <= max_rows:
    raise ProtocolError(f"input {signature.input_name!r}: batch of "
                        f"{shape[0]} rows; send 1 to {max_rows} (the largest "
                        "compiled bucket) per request")
  return tuple(shape)


def parse_infer(body: bytes, header_length: str | None, signature: Signature,
                max_rows: int) -> InferRequest:
  """An infer request's body (and its Inference-Header-Content-Length
  header, if any) as the model's input rows."""
  header, binary = _header(body, header_length)
  inputs = header.get("inputs")
  if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(
      inputs[0], dict):
    raise ProtocolError(f"'inputs' must list exactly one tensor, "
                        f"{signature.input_name!r}")
  tensor = inputs[0]
  if tensor.get("name") != signature.input_name:
    raise ProtocolError(f"unknown input {tensor.get('name')!r}; the model's "
                        f"input is {signature.input_name!r}")
  if tensor.get("datatype") != signature.input_datatype:
    raise ProtocolError(f"input {signature.input_name!r} has datatype "
                        f"{tensor.get('datatype')!r}; the model takes "
                        f"{signature.input_datatype}")
  shape = _shape(tensor, signature, max_rows)
  dtype = np.dtype(DATATYPES[signature.input_datatype])
  count = math.prod(shape)
  params = tensor.get("parameters") or {}
  if "binary_data_size" in params:
    size = params["binary_data_size"]
    if size != count * dtype.itemsize or size != len(binary):
      raise ProtocolError(f"input {signature.input_name!r}: binary_data_size "
                          f"{size} with {len(binary)} bytes after the header; "
                          f"shape {list(shape)} of {signature.input_datatype} "
                          f"needs {count * dtype.itemsize}")
    array = np.frombuffer(binary, dtype.newbyteorder("<")).reshape(shape)
  else:
    if binary:
      raise ProtocolError(f"{len(binary)} bytes after the JSON header but no "
                          "input declares binary_data_size")
    array = _json_data(tensor.get("data"), shape, dtype, signature.input_name)
  request_params = header.get("parameters") or {}
  if not isinstance(request_params, dict):
    raise ProtocolError("'parameters' must be an object")
  return InferRequest(array, header.get("id"),
                      _binary_output(header, request_params, signature),
                      request_params)


def _json_data(data, shape: tuple, dtype: np.dtype, name: str) -> np.ndarray:
  if not isinstance(data, list):
    raise ProtocolError(f"input {name!r}: 'data' must be a list (or the "
                        "tensor sent as binary data)")
  try:
    array = np.array(data)
  except ValueError as e:  # ragged nesting
    raise ProtocolError(f"input {name!r}: 'data' is not a regular array ({e})"
                        ) from None
  if array.dtype.kind not in "biuf" or array.size != math.prod(shape):
    raise ProtocolError(f"input {name!r}: 'data' must hold {math.prod(shape)}"
                        f" numbers for shape {list(shape)}, got {array.size} "
                        f"of kind {array.dtype.kind!r}")
  return array.astype(dtype).reshape(shape)


def _binary_output(header: dict, params: dict, signature: Signature) -> bool:
  outputs = header.get("outputs")
  if outputs is None:
    return bool(params.get("binary_data_output", False))
  if not isinstance(outputs, list) or not all(
      isinstance(o, dict) and o.get("name") == signature.output_name
      for o in outputs):
    raise ProtocolError(f"'outputs' may only ask for "
                        f"{signature.output_name!r}")
  return any((o.get("parameters") or {}).get("binary_data", False)
             for o in outputs) or bool(params.get("binary_data_output", False))


def encode_infer(name: str, version: str, request: InferRequest,
                 outputs: np.ndarray, signature: Signature
                 ) -> tuple[bytes, dict[str, str]]:
  """(body, extra headers) of an infer response."""
  outputs = np.ascontiguousarray(
      outputs, DATATYPES[signature.output_datatype]).astype(
          np.dtype(DATATYPES[signature.output_datatype]).newbyteorder("<"),
          copy=False)
  tensor = {"name": signature.output_name,
            "datatype": signature.output_datatype,
            "shape": list(outputs.shape)}
  response = {"model_name": name, "model_version": version}
  if request.id is not None:
    response["id"] = request.id
  response["outputs"] = [tensor]
  if not request.binary_output:
    tensor["data"] = outputs.reshape(-1).tolist()
    return json.dumps(response).encode(), {}
  raw = outputs.tobytes()
  tensor["parameters"] = {"binary_data_size": len(raw)}
  header = json.dumps(response).encode()
  return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def error_body(message: str) -> bytes:
  return json.dumps({"error": message}).encode()
