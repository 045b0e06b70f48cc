"""How a family declares its shallower members, read by the optimizer.

At batch 1 a CPU call costs about a fixed amount per op, so removing a layer
buys more than narrowing every layer (structured pruning to 26% of the FLOPs
bought 1.25x at batch 1 in this repository, 2.05x at batch 256). Which
constructor arguments hold a family's depth is the family's knowledge, so it
is declared beside its class: a static `shallower(args) -> [args]` (the
family's full constructor arguments in, one set per shallower member out;
none when it is already as shallow as it goes), or `no_shallower = "why"`
for a family whose depth is not an argument. rtjax.models.registry refuses a
family that declares neither, so none silently gets no students.
"""

from __future__ import annotations

from rtjax.models.registry import full_args, model_class


def trim(value, depth: int):
  """A per-layer argument cut to `depth` entries (one value for all stays)."""
  return list(value)[:depth] if isinstance(value, (list, tuple)) else value


def shallower(name: str, args: dict) -> list[dict]:
  """Constructor args of each shallower member of family `name`, keys the
  constructor does not take dropped (none for a family that declares
  `no_shallower`, or one already a single layer deep)."""
  cls = model_class(name)
  rule = getattr(cls, "shallower", None)
  if rule is None:
    return []
  full = full_args(cls, args)
  return [{k: v for k, v in a.items() if k in full} for a in rule(full)]


def no_shallower_reason(name: str) -> str | None:
  """Why family `name` has no shallower members; None when it has a rule."""
  return getattr(model_class(name), "no_shallower", None)
