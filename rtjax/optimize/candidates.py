"""The candidates a search trains: recipes (plain JSON, so a resumed search
rebuilds exactly the same ones) and the models they start from.

  uniform<k>   every prunable group kept at k%
  sens<t>      per-group keep fractions from the sensitivity: each group as
               small as it goes while losing at most t points without
               fine-tuning; groups whose pruning measured no speedup are kept
  drop<k>      the parent without the k blocks whose removal alone cost
               least validation accuracy (layer dropping); drop_alternate
               without every other droppable block (DistilBERT's student),
               drop_last<k> without the last k: each keeps the parent's
               weights of the blocks it keeps
  shallow<i>   a shallower member of the family (its depth rule,
               rtjax.models.depth; a family without one is logged),
               and shallow<i>_half at half its widths, trained from scratch
Every candidate is fine-tuned (or trained) by distillation from the parent.
"""

from __future__ import annotations

from absl import logging
from flax import nnx

from rtjax import models
from rtjax.compress import structured
from rtjax.optimize.sensitivity import group_names, shrink_groups

UNIFORM = (0.75, 0.5, 0.375, 0.25)  # of a power-of-two width: multiples of 8
THRESHOLDS = (1.0, 3.0, 10.0, 30.0)  # points of validation accuracy
# A group whose pruning measured under 2% faster is kept: within one
# interleaved run's noise, a measurement floor rather than a trade-off to
# tune, so not a setting.
NO_GAIN = 1.02


def _keep_for(entries: list[dict], threshold: float) -> float:
  """The smallest fraction such that it and every larger one measured lose
  at most `threshold` points."""
  keep = 1.0
  for e in sorted(entries, key=lambda e: -e["keep"]):
    if e["accuracy_drop"] > threshold:
      break
    keep = e["keep"]
  return keep


def from_scratch(recipe: dict) -> bool:
  """Whether the candidate starts from a fresh initialization (a student),
  not from the parent's weights (pruned, or the parent's own blocks)."""
  return recipe["kind"] == "student"


def _drops(spec: dict, blocks: list[dict]) -> list[tuple[str, list[int]]]:
  """(name, blocks to drop) of the layer-dropping candidates, from the
  sensitivity's per-block accuracy drops; at least one block stays."""
  droppable = [e["index"] for e in blocks]
  most = min(len(droppable),
             models.block_count(spec["name"], spec["args"]) - 1)
  cheapest = [e["index"] for e in sorted(blocks,
                                         key=lambda e: e["accuracy_drop"])]
  out = [(f"drop{k}", sorted(cheapest[:k])) for k in range(1, most + 1)]
  out.append(("drop_alternate", droppable[1::2]))
  half = len(droppable) // 2
  out.append((f"drop_last{half}", droppable[len(droppable) - half:]))
  return [(n, d) for n, d in out if 0 < len(d) <= most]


def _kept_widths(spec: dict, keep: dict, round_to: int = 1) -> dict:
  """{group: units kept} of a keep map: what identifies a pruned
  architecture (fractions of a narrow group can round to the same count)."""
  cls = models.model_class(spec["name"])
  return {g.name: structured.kept_count(g.width, keep[g.name], round_to,
                                        g.unit)
          for g in cls.prunable_groups(spec["args"])}


def recipes(spec: dict, sens: dict, uniform=UNIFORM,
            thresholds=THRESHOLDS, shallow: bool = True,
            lanes: int | None = None) -> list[dict]:
  """Candidate recipes, without duplicates (the same kept widths, blocks
  dropped or args) and without pruned ones that keep every unit. With
  `lanes` (a TPU slice's), each uniform fraction also with its kept widths
  rounded up to whole lane tiles, where that differs from the plain cut."""
  groups = group_names(spec)
  full = repr(sorted(_kept_widths(spec, dict.fromkeys(groups, 1.0)).items())
              ) if groups else None
  out, seen = [], {full}

  def add(recipe, key):
    if key not in seen:
      seen.add(key)
      out.append(recipe)

  def widths(keep, round_to=1):
    return repr(sorted(_kept_widths(spec, keep, round_to).items()))

  for fraction in uniform if groups else ():
    keep = dict.fromkeys(groups, fraction)
    add({"name": f"uniform{100 * fraction:g}", "kind": "prune",
         "keep": keep}, widths(keep))
    if lanes:
      add({"name": f"uniform{100 * fraction:g}_lanes", "kind": "prune",
           "keep": keep, "round_to": lanes}, widths(keep, lanes))
  for t in thresholds if groups else ():
    keep = {}
    for g in groups:
      entries = [e for e in sens["groups"] if e["name"] == g]
      gain = max((e["speedup_p50"] for e in entries), default=1.0)
      keep[g] = _keep_for(entries, t) if gain >= NO_GAIN else 1.0
    add({"name": f"sens{t:g}", "kind": "prune", "keep": keep}, widths(keep))
  for name, drop in _drops(spec, sens.get("blocks", [])):
    add({"name": name, "kind": "drop", "drop": drop}, repr(drop))
  reason = models.no_shallower_reason(spec["name"])
  if shallow and reason:
    logging.info("no shallower students of %s: %s", spec["name"], reason)
  for i, args in enumerate(models.shallower(spec["name"], spec["args"])
                           if shallow else ()):
    add({"name": f"shallow{i}", "kind": "student", "args": args},
        repr(sorted(args.items())))
    cls = models.model_class(spec["name"])
    if hasattr(cls, "prunable_groups"):
      half = cls.with_widths(args, {g.name: structured.kept_count(
          g.width, 0.5, 1, g.unit) for g in cls.prunable_groups(args)})
      add({"name": f"shallow{i}_half", "kind": "student", "args": half},
          repr(sorted(half.items())))
  return out


def build(recipe: dict, parent: nnx.Module, spec: dict, seed: int = 0
          ) -> tuple[nnx.Module, dict]:
  """(the candidate's starting model, its spec): the parent's weights cut
  down for a pruned candidate, the parent's kept blocks for a dropped one,
  a fresh initialization for a student."""
  if recipe["kind"] == "parent":
    return parent, spec
  if recipe["kind"] == "prune":
    model, args = shrink_groups(parent, spec, recipe["keep"],
                                round_to=recipe.get("round_to", 1))
  elif recipe["kind"] == "drop":
    model, args = models.drop_blocks(parent, spec["name"], spec["args"],
                                     recipe["drop"])
  else:
    args = recipe["args"]
    model = models.create_model(spec["name"], args, seed)
  return model, {"name": spec["name"], "args": args}
