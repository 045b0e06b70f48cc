"""The metadata of checkpoints a search writes besides its candidates'
rungs: int8 variants of finalists, the parent and the chosen model with the
serving options they were measured with. Each is written by
rtjax.checkpoint.save_complete_step as one complete step, lineage in its
metadata, that experiments.bench, compare, predict, serve and export take;
the options sit in metadata['serving'][device kind], which
rtjax.infer.options applies by default on that kind of device only.
"""

from __future__ import annotations

import jax
from flax import nnx

from rtjax.infer import options as options_lib
from rtjax.models import forward_flops, param_count
from rtjax.optimize import estimated
from rtjax.target import Target


def served_metadata(metadata: dict, *, stage: str, stage_type: str,
                    parent: str, options: dict, measured: dict,
                    done: dict, target: Target | None = None) -> dict:
  """`metadata` re-labelled as a served checkpoint: the serving options for
  this kind of device (others keep theirs) and what was measured with them;
  for a `target` slice, the options for a TPU and what was predicted there
  (under 'serving_predicted', with the slice's name)."""
  kind = "tpu" if target else options_lib.device_kind()
  serving = dict(metadata.get("serving") or {})
  serving[kind] = {k: options[k] for k in options_lib.OPTIONS
                   if k in options}  # what the search chose
  figures = {"device_kind": kind, **measured}
  if target:
    figures.update(target=target.name, device=target.devices[0].device_kind,
                   label=estimated.label(target.name))
  else:
    figures["device"] = jax.devices()[0].device_kind
  key = "serving_predicted" if target else "serving_measured"
  return {**metadata, "stage": stage, "stage_type": stage_type,
          "parent": parent, "serving": serving,
          "done": {**done, key: figures}}


def int8_metadata(metadata: dict, model: nnx.Module, qspec: dict, *,
                  stage: str, parent: str, metrics: dict) -> dict:
  """A finalist's metadata for its int8 (PTQ) variant."""
  shape = metadata["model"]["args"]["input_shape"]
  return {**metadata, "stage": stage, "stage_type": "optimize_int8",
          "parent": parent, "model": {**metadata["model"],
                                      "quantization": qspec},
          "done": {"quantization": qspec}, "metrics": metrics,
          "param_count": param_count(model),
          "flops_per_example": forward_flops(model, shape)}
