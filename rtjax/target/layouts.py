"""How much of each array's padded tiles holds data, read from a compiled
executable's layouts.

A TPU stores an array in tiles: XLA:TPU gives every array a layout such as
`f32[256,40]{1,0:T(8,128)}`, i.e. its dimensions ordered minor to major
(`{1,0}`: dimension 1 is the most minor, on the lanes) and one or more tiles
applied in turn to the most minor dimensions, each rounding them up to a
multiple of the tile (`T(8,128)`: 8 sublanes x 128 lanes; bf16's
`T(8,128)(2,1)` and int8's `T(8,128)(4,1)` then pack 2 or 4 of the tile's
rows per 32-bit word and pad no further; vectors get `T(128)` or
`T(256)(128)(2,1)`). An f32[256,40] activation thus occupies 256 x 128
slots for 256 x 40 values: 31% of its tiles hold data, and narrowing 40 to
32 columns would save nothing. The bytes XLA:TPU's memory analysis gives
for an executable's arguments are exactly these padded sizes
(tests/test_targets.py checks it).

Where the layouts come from:
  * weights and inputs: `Compiled.input_formats` (per argument of the
    executable, its Layout's `major_to_minor` and `tiling`), applied to the
    shape of one device's shard (`sharding.shard_shape`), named by the
    argument's path ('0/conv1/kernel');
  * activations: the optimized HLO text (`Compiled.as_text()`), which is
    already partitioned (one device's shapes): every array an instruction of
    the ENTRY computation produces, i.e. what lives in memory between
    fusions (values inside a fusion are not counted; parameters are the
    weights above; tuples, get-tuple-element, bitcasts and the async copies
    that move an array between memories name arrays counted elsewhere).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterable, Sequence

import jax

from rtjax.models.groups import path_name


@dataclasses.dataclass(frozen=True)
class ArrayTiles:
  """One array as laid out: its shape on one device, dimension order and tiles."""
  name: str
  dtype: str
  shape: tuple[int, ...]
  major_to_minor: tuple[int, ...]
  tiles: tuple[tuple[int, ...], ...]

  @property
  def elements(self) -> int:
    return math.prod(self.shape)

  @property
  def padded_elements(self) -> int:
    return padded_elements(self.shape, self.major_to_minor, self.tiles)

  @property
  def data_share(self) -> float:
    """The share of the padded tiles' slots that holds values (1.0: none wasted)."""
    padded = self.padded_elements
    return self.elements / padded if padded else 1.0


def padded_elements(shape: Sequence[int], major_to_minor: Sequence[int],
                    tiles: Iterable[Sequence[int]]) -> int:
  """Slots an array occupies: its dimensions in memory order (major to
  minor), then each tile in turn applied to the most minor dimensions (XLA's
  tiling: a shape of fewer dimensions than the tile gains leading 1s; each
  tiled dimension becomes ceil(d / t) tiles of t), the product of the result."""
  physical = [int(shape[d]) for d in major_to_minor]
  for tile in tiles:
    tile = [int(t) for t in tile]
    if len(tile) > len(physical):
      physical = [1] * (len(tile) - len(physical)) + physical
    outer, minor = physical[:-len(tile)], physical[-len(tile):]
    counts = [d if t < 0 else -(-d // t) for d, t in zip(minor, tile)]
    physical = outer + counts + [1 if t < 0 else t for t in tile]
  return math.prod(physical)


def weight_tiles(compiled: jax.stages.Compiled) -> list[ArrayTiles]:
  """Every argument of `compiled` (weights, then inputs) as laid out on one
  device, from its input formats."""
  formats = jax.tree_util.tree_flatten_with_path(
      compiled.input_formats,
      is_leaf=lambda x: hasattr(x, "layout") and hasattr(x, "sharding"))[0]
  avals = jax.tree.leaves(compiled.in_avals)
  arrays = []
  for (path, fmt), aval in zip(formats, avals):
    layout = getattr(fmt, "layout", None)
    if layout is None or not hasattr(layout, "major_to_minor"):
      continue  # an argument the compiler dropped (unused)
    shape = tuple(fmt.sharding.shard_shape(aval.shape))
    # Paths start at the (args, kwargs) pair: "0/conv1/kernel" is a weight
    # of the first argument.
    arrays.append(ArrayTiles(path_name(path[1:]), str(aval.dtype), shape,
                             tuple(layout.major_to_minor),
                             tuple(layout.tiling or ())))
  return arrays


_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8\w*)\[([\d,]*)\](?:\{([^}]*)\})?")
_TILING = re.compile(r"T((?:\([-\d,]+\))+)")  # T(8,128)(2,1)
_TILE = re.compile(r"\(([-\d,]+)\)")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
# Instructions whose result names arrays counted elsewhere, or none:
# copy-start/copy-done move an array between memories (XLA:TPU prefetches
# weights into the chip's vector memory, S(1)) without making a new one.
_NOT_STORAGE = ("parameter", "tuple", "get-tuple-element", "bitcast",
                "copy-start", "copy-done", "opt-barrier", "after-all",
                "partition-id", "replica-id")


def _entry_lines(hlo_text: str) -> list[str]:
  lines, inside = [], False
  for line in hlo_text.splitlines():
    if line.startswith("ENTRY "):
      inside = True
    elif inside and line.startswith("}"):
      break
    elif inside:
      lines.append(line)
  return lines


def _result_type(rhs: str) -> tuple[str, str]:
  """(result type, opcode) of an instruction's right-hand side."""
  if rhs.startswith("("):  # a tuple type: up to its matching parenthesis
    depth = 0
    for end, char in enumerate(rhs):
      depth += {"(": 1, ")": -1}.get(char, 0)
      if depth == 0:
        break
    kind, rest = rhs[:end + 1], rhs[end + 1:]
  else:
    kind, _, rest = rhs.partition(" ")
  return kind, rest.strip().partition("(")[0]


def _parse_array(name: str, dtype: str, dims: str, layout: str | None
                 ) -> ArrayTiles:
  shape = tuple(int(d) for d in dims.split(",") if d)
  order, _, tiling = (layout or "").partition(":")
  minor_to_major = tuple(int(d) for d in order.split(",") if d)
  if len(minor_to_major) != len(shape):
    minor_to_major = tuple(reversed(range(len(shape))))
  tiling = _TILING.search(tiling)
  tiles = tuple(tuple(int(t) for t in tile.split(","))
                for tile in _TILE.findall(tiling.group(1) if tiling else ""))
  return ArrayTiles(name, dtype, shape, minor_to_major[::-1], tiles)


def activation_tiles(hlo_text: str) -> list[ArrayTiles]:
  """Every array the ENTRY computation's instructions produce, as laid out."""
  arrays = []
  for line in _entry_lines(hlo_text):
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, rhs = match.groups()
    kind, opcode = _result_type(rhs)
    if opcode in _NOT_STORAGE:
      continue
    for index, (dtype, dims, layout) in enumerate(_ARRAY.findall(kind)):
      suffix = f"[{index}]" if kind.startswith("(") else ""
      arrays.append(_parse_array(name + suffix, dtype, dims, layout))
  return arrays


def data_share(arrays: Sequence[ArrayTiles]) -> float | None:
  """Values over padded slots, summed over `arrays` (weighted by size);
  None for no arrays."""
  padded = sum(a.padded_elements * _itemsize(a.dtype) for a in arrays)
  if not padded:
    return None
  return sum(a.elements * _itemsize(a.dtype) for a in arrays) / padded


def most_wasteful(arrays: Sequence[ArrayTiles]) -> ArrayTiles | None:
  """The array whose padding wastes the most bytes."""
  return max(arrays, default=None, key=lambda a: (
      (a.padded_elements - a.elements) * _itemsize(a.dtype)))


def _itemsize(dtype: str) -> float:
  """Bytes per element of a jax ('bfloat16') or HLO ('bf16', 's8') dtype."""
  bits = re.match(r"[a-z]+?(\d+)", dtype)
  return int(bits.group(1)) / 8 if bits else 1  # pred: one byte
