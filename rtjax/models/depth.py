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

from flax import nnx

from rtjax.models.registry import (abstract_model, create_model, full_args,
                                   model_class)


def trim(value, depth: int):
  """A per-layer argument cut to `depth` entries (one value for all stays)."""
  return list(value)[:depth] if isinstance(value, (list, tuple)) else value


def kept(value, blocks):
  """A per-layer argument with only the layers `blocks` (indices; one
  value for all stays)."""
  if isinstance(value, (list, tuple)):
    return [value[i] for i in blocks]
  return value


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


# ---- layer dropping: a shallower model from the parent's own blocks --------
#
# A family whose blocks can go without changing any other weight's shape
# (residual blocks of one width, stacked recurrent layers of equal width)
# declares `droppable_blocks(args) -> [block index]`, `without_blocks(args,
# drop) -> args` and `block_stacks`, the names of its lists of blocks (one
# entry per block in each). The shallower model keeps the parent's weights
# for everything it keeps: the field's initialisation of a student from a
# subset of its teacher's layers (DistilBERT), then distilled.


def droppable_blocks(name: str, args: dict) -> list[int]:
  """The blocks of family `name` that layer dropping may remove (none for
  a family that declares no rule)."""
  cls = model_class(name)
  rule = getattr(cls, "droppable_blocks", None)
  return list(rule(full_args(cls, args))) if rule else []


def drop_blocks(model, name: str, args: dict, drop) -> tuple:
  """(the parent without blocks `drop`, its args): every kept weight is the
  parent's, blocks renumbered in order."""
  cls = model_class(name)
  full = full_args(cls, args)
  drop = sorted(set(drop))
  if not set(drop) <= set(droppable_blocks(name, full)):
    raise ValueError(f"{name}: blocks {drop} are not all droppable "
                     f"(droppable: {droppable_blocks(name, full)})")
  total = len(getattr(model, cls.block_stacks[0]))
  kept = [i for i in range(total) if i not in drop]
  if not kept:
    raise ValueError(f"{name}: dropping every block leaves no model")
  new_args = cls.without_blocks(full, drop)
  smaller = create_model(name, new_args)
  old = dict(nnx.to_flat_state(nnx.state(model)))
  state = nnx.state(smaller)
  for path, variable in nnx.to_flat_state(state):
    source = (path[0], kept[path[1]], *path[2:]) if (
        path[0] in cls.block_stacks) else path
    value = old[source].get_value()
    if value.shape != variable.get_value().shape:
      raise ValueError(f"{name}: dropping blocks {drop} changes the shape of "
                       f"{'/'.join(map(str, path))}")
    variable.set_value(value)
  nnx.update(smaller, state)
  return smaller, {k: v for k, v in new_args.items() if k in args or
                   new_args[k] != full.get(k)}


def block_count(name: str, args: dict) -> int:
  """How many blocks family `name` stacks (0 for one without the rule)."""
  cls = model_class(name)
  if not getattr(cls, "block_stacks", None):
    return 0
  return len(getattr(abstract_model(name, full_args(cls, args)),
                     cls.block_stacks[0]))
