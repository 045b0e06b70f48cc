"""Shallower students: the parent's family with fewer blocks or layers.

At batch 1 a CPU call costs about a fixed amount per op, so removing a layer
buys more than narrowing every layer (structured pruning to 26% of the FLOPs
bought 1.25x at batch 1 in this repository, 2.05x at batch 256). Which
constructor argument holds a family's depth is part of the search space, so
it is listed here by family name; the layers themselves stay the family's.
"""

from __future__ import annotations

from rtjax.models import model_class
from rtjax.models.registry import full_args


def _trim(value, depth: int):
  """A per-layer argument cut to `depth` entries (a scalar stays)."""
  return list(value)[:depth] if isinstance(value, (list, tuple)) else value


def _resnet(args: dict) -> list[dict]:
  out = []
  blocks = list(args["blocks_per_stage"])
  base = {k: v for k, v in args.items()
          if k not in ("inner_widths", "projections")}
  if any(b > 1 for b in blocks):
    out.append({**base, "blocks_per_stage": [max(1, b - 1) for b in blocks]})
  if len(blocks) > 1:
    out.append({**base, **{k: list(args[k])[:-1] for k in (
        "stage_widths", "blocks_per_stage", "stage_strides")}})
  return out


def _cnn1d(args: dict) -> list[dict]:
  depth = len(args["channels"]) - 1
  if depth < 1:
    return []
  return [{**args, **{k: _trim(args[k], depth) for k in (
      "channels", "kernel_size", "strides")}}]


def _hidden(args: dict) -> list[dict]:
  hidden = list(args["hidden"])
  return [{**args, "hidden": hidden[:-1]}] if len(hidden) > 1 else []


def _transformer(args: dict) -> list[dict]:
  depth = args["depth"] - 1
  if depth < 1:
    return []
  return [{**args, "depth": depth, "num_heads": _trim(args["num_heads"], depth),
           "mlp_dim": _trim(args["mlp_dim"], depth)}]


DEPTH_RULES = {"resnet": _resnet, "cnn1d": _cnn1d, "mlp": _hidden,
               "gru": _hidden, "lstm": _hidden, "vit": _transformer,
               "transformer1d": _transformer}


def shallower(name: str, args: dict) -> list[dict]:
  """Constructor args of each shallower member of the family (none when the
  family has no depth rule or is already one layer deep)."""
  rule = DEPTH_RULES.get(name)
  if rule is None:
    return []
  full = full_args(model_class(name), args)
  return [{k: v for k, v in a.items() if k in full or k in args}
          for a in rule(full)]
