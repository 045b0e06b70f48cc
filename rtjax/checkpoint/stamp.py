"""What every checkpoint's metadata records about itself, and the checks on
load: a schema version (a checkpoint from a newer rtjax gets a clear
message), the versions of rtjax and its libraries, the device kind it was
written on, and a content hash of the model's arrays (silent corruption is
caught, not served).
"""

from __future__ import annotations

import hashlib
import importlib.metadata

import jax
import numpy as np
from flax import traverse_util

import rtjax
from rtjax.errors import CheckpointError

# 1: the first release (no stamp). 2: stamp with versions and params hash.
SCHEMA_VERSION = 2
_PACKAGES = ("jax", "flax", "orbax-checkpoint", "qwix")


def _host(value) -> np.ndarray:
  """The whole value of a (possibly multi-process, replicated) array."""
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    if value.sharding.is_fully_replicated:
      return np.asarray(value.addressable_data(0))
    from jax.experimental import multihost_utils  # a collective: all call it
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))
  return np.asarray(value)


def params_digest(model_dict: dict) -> str:
  """sha256 over every array of a model item (path, dtype, shape, bytes)."""
  digest = hashlib.sha256()
  flat = traverse_util.flatten_dict(model_dict)
  for key in sorted(flat, key=lambda k: "/".join(map(str, k))):
    value = np.ascontiguousarray(_host(flat[key]))
    digest.update("/".join(map(str, key)).encode())
    digest.update(f"{value.dtype}{value.shape}".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def versions() -> dict[str, str]:
  out = {"rtjax": rtjax.__version__}
  for name in _PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out


def stamp(model_dict: dict) -> dict:
  """The keys save() adds to a checkpoint's metadata."""
  return {"schema_version": SCHEMA_VERSION, "versions": versions(),
          "device_kind": jax.devices()[0].device_kind,
          "params_sha256": params_digest(model_dict)}


def check_schema(metadata: dict, where) -> None:
  """Refuses a checkpoint written with a schema this rtjax does not know."""
  schema = metadata.get("schema_version", 1)
  if schema > SCHEMA_VERSION:
    written_by = metadata.get("versions", {}).get("rtjax", "a newer rtjax")
    raise CheckpointError(
        f"{where} was written by rtjax {written_by} (checkpoint schema "
        f"{schema}); this rtjax {rtjax.__version__} reads schema <= "
        f"{SCHEMA_VERSION}: upgrade rtjax to read it")


def check_digest(metadata: dict, model_dict: dict, where) -> None:
  """Refuses arrays whose hash differs from the one recorded at save."""
  expected = metadata.get("params_sha256")
  if expected and params_digest(model_dict) != expected:
    raise CheckpointError(
        f"{where}: the model's arrays do not match the content hash "
        "recorded when it was saved (the files were changed or corrupted "
        "after writing); restore it from a copy or use another step")
