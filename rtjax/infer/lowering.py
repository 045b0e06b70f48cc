"""Conv lowerings for serving: XLA's own convolution, or the same conv as one
matmul over tiles of the input, chosen per layer and batch by measuring.

XLA's CPU convolution runs few-channel layers slowly (LeNet-5's 3 -> 6 first
conv: under 10 GFLOP/s, on one core; experiments.bench_lowering), while its
matmuls run on every core at a few hundred. A stride-1 conv is a matmul over input tiles: each
(rows + kh - 1) x (cols + kw - 1) input tile times a banded (block-Toeplitz)
matrix that holds the kernel once per output pixel of the rows x cols output
block. That costs (rows + kh - 1)(cols + kw - 1) / (kh kw) times the conv's
FLOPs and a copy of the tiles, so whether it wins depends on the layer, the
batch size and the machine: `choose_lowering` times the candidates on the
hardware at hand.

Any conv (strided, 1D, few channels) can also run as one matmul over its
input patches ("patches", im2col): the patches are gathered by strided
slices and no FLOPs are added; for small strided and 1D convs XLA's CPU
matmul can beat its convolution. Which wins is measured, like the rest.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rtjax.models.stats import layer_shapes
from rtjax.timing import time_calls

# At most this many times the conv's FLOPs: larger blocks are never faster.
MAX_FLOP_INFLATION = 4.0
# Banded matrices above this many float32 entries (16 MB) are not tried.
MAX_MATRIX_ENTRIES = 4 * 2**20

PATCHES = "patches"
# Output (rows, cols) per banded matmul row, or PATCHES.
Block = tuple[int, int] | str
Lowering = dict[str, Block]  # conv layer path -> block (absent: XLA's conv)


def _explicit_padding(conv: nnx.Conv, spatial: Sequence[int]):
  """((low, high) per spatial axis) of the conv, or None when its padding
  cannot be written as such (circular and the like)."""
  padding = conv.padding
  if isinstance(padding, str):
    if padding.upper() not in ("VALID", "SAME"):
      return None
    return jax.lax.padtype_to_pads(spatial, conv.kernel_size,
                                   _strides(conv), padding.upper())
  try:
    return [tuple(p) for p in nnx.nn.linear.canonicalize_padding(
        padding, len(spatial))]
  except (ValueError, TypeError):
    return None


def _strides(conv: nnx.Conv) -> tuple[int, ...]:
  strides = conv.strides
  if strides is None:
    return (1,) * len(conv.kernel_size)
  return tuple(np.broadcast_to(np.atleast_1d(strides), len(conv.kernel_size)))


def _all_ones(value) -> bool:
  return value is None or all(v == 1 for v in np.atleast_1d(value))


def _is_plain_conv(conv: nnx.Conv) -> bool:
  """A float32 conv without dilation, groups or mask: one a matmul can
  compute."""
  kernel = conv.kernel[...]
  return (_all_ones(conv.input_dilation) and _all_ones(conv.kernel_dilation)
          and conv.feature_group_count == 1 and conv.mask is None
          and conv.conv_general_dilated is jax.lax.conv_general_dilated
          and isinstance(kernel, jax.Array)  # not an int8 (qwix) kernel
          and kernel.dtype == jnp.float32 and conv.dtype in (None, jnp.float32))


def _is_plain_2d_conv(conv: nnx.Conv) -> bool:
  return (len(conv.kernel_size) == 2 and _all_ones(conv.strides)
          and _is_plain_conv(conv))


def banded_matrix(kernel: np.ndarray, block: Block) -> np.ndarray:
  """(kh, kw, C, F) kernel -> (tile rows * tile cols * C, rows * cols * F):
  row (i, j, c), column (y, x, f) holds kernel[i - y, j - x, c, f] where in
  range; a tile is (rows + kh - 1) x (cols + kw - 1)."""
  kh, kw, channels, features = kernel.shape
  rows, cols = block
  matrix = np.zeros((rows + kh - 1, cols + kw - 1, channels, rows, cols,
                     features), kernel.dtype)
  for y in range(rows):
    for x in range(cols):
      matrix[y:y + kh, x:x + kw, :, y, x, :] = kernel
  return matrix.reshape(-1, rows * cols * features)


class BandedConv(nnx.Module):
  """A stride-1 nnx.Conv computed as one banded matmul (same outputs)."""

  def __init__(self, conv: nnx.Conv, input_shape: Sequence[int], block: Block):
    """`input_shape`: the conv's (H, W, C) input; `block`: (rows, cols) of
    output per matmul row, divisors of the output's height and width."""
    height, width, _ = input_shape
    self.pads = _explicit_padding(conv, (height, width))
    (top, bottom), (left, right) = self.pads
    kh, kw = conv.kernel_size
    out_shape = (height + top + bottom - kh + 1, width + left + right - kw + 1)
    if any(size % b for size, b in zip(out_shape, block)):
      raise ValueError(f"block {block} does not divide the conv's output "
                       f"{out_shape[0]}x{out_shape[1]}")
    self.kernel_size = (kh, kw)
    self.features = conv.out_features
    self.block = tuple(block)
    self.matrix = nnx.Param(jnp.asarray(
        banded_matrix(np.asarray(conv.kernel[...]), self.block)))
    self.bias = (nnx.Param(conv.bias[...]) if conv.bias is not None
                 else nnx.data(None))

  def __call__(self, x: jax.Array) -> jax.Array:
    (top, bottom), (left, right) = self.pads
    if top or bottom or left or right:
      x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    (kh, kw), (rows, cols) = self.kernel_size, self.block
    batch, height, width, _ = x.shape
    out_h, out_w = height - kh + 1, width - kw + 1
    tile_h, tile_w = rows + kh - 1, cols + kw - 1
    # (batch, out_h / rows, tile_h, width, C): tile row i of every block row.
    bands = jnp.stack([x[:, i:i + out_h - rows + 1:rows] for i in range(tile_h)],
                      axis=2)
    tiles = jnp.stack(  # (batch, out_h / rows, out_w / cols, tile_h, tile_w, C)
        [bands[:, :, :, start:start + tile_w]
         for start in range(0, out_w, cols)], axis=2)
    y = tiles.reshape(-1, self.matrix.shape[0]) @ self.matrix[...]
    y = y.reshape(batch, out_h // rows, out_w // cols, rows, cols, self.features)
    y = y.transpose(0, 1, 3, 2, 4, 5).reshape(batch, out_h, out_w, self.features)
    return y + self.bias[...] if self.bias is not None else y


class PatchConv(nnx.Module):
  """An nnx.Conv of any rank and strides as one matmul over its input
  patches (same outputs): patch (i, ..., c) of output position p is the
  padded input at p * stride + i, channel c."""

  def __init__(self, conv: nnx.Conv, input_shape: Sequence[int]):
    """`input_shape`: the conv's (*spatial, C) input."""
    self.pads = tuple(_explicit_padding(conv, input_shape[:-1]))
    self.strides = _strides(conv)
    self.kernel_size = tuple(conv.kernel_size)
    self.kernel = nnx.Param(conv.kernel[...].reshape(-1, conv.out_features))
    self.bias = (nnx.Param(conv.bias[...]) if conv.bias is not None
                 else nnx.data(None))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.pad(x, ((0, 0), *self.pads, (0, 0)))
    out = [(size - k) // s + 1 for size, k, s in zip(
        x.shape[1:-1], self.kernel_size, self.strides)]
    patches = jnp.stack([
        x[(slice(None), *(slice(i, i + s * (n - 1) + 1, s) for i, s, n in zip(
            offset, self.strides, out)))]
        for offset in np.ndindex(*self.kernel_size)], axis=-2)
    y = patches.reshape(*patches.shape[:-2], -1) @ self.kernel[...]
    return y + self.bias[...] if self.bias is not None else y


def candidate_blocks(model: nnx.Module,
                     input_shape: Sequence[int]) -> dict[str, list[Block]]:
  """Per float conv layer path: the lowerings worth timing (patches for
  every plain conv, banded blocks for stride-1 2D ones)."""
  shapes = layer_shapes(model, input_shape)
  candidates = {}
  for path, module in nnx.iter_graph(model):
    name = "/".join(map(str, path))
    if (not isinstance(module, nnx.Conv) or name not in shapes
        or not _is_plain_conv(module)
        or _explicit_padding(module, shapes[name][0][1:-1]) is None):
      continue
    candidates[name] = [PATCHES]
    if not _is_plain_2d_conv(module):
      continue
    (_, height, width, _), _ = shapes[name]
    pads = _explicit_padding(module, (height, width))
    kh, kw = module.kernel_size
    out_h = height + sum(pads[0]) - kh + 1
    out_w = width + sum(pads[1]) - kw + 1
    # Whole-row blocks (1 x cols) and square ones: the shapes that won here.
    tried = [(1, c) for c in range(2, out_w + 1) if out_w % c == 0]
    tried += [(b, b) for b in range(2, min(out_h, out_w) + 1)
                if out_h % b == 0 and out_w % b == 0]
    blocks = [(r, c) for r, c in tried
              if (r + kh - 1) * (c + kw - 1) / (kh * kw) <= MAX_FLOP_INFLATION
              and ((r + kh - 1) * (c + kw - 1) * module.in_features * r * c
                   * module.out_features) <= MAX_MATRIX_ENTRIES]
    candidates[name] += blocks
  return candidates


def all_patches(model: nnx.Module, input_shape: Sequence[int]) -> Lowering:
  """Every conv that can be lowered, as patches ({} when there is none)."""
  return _as_patches(candidate_blocks(model, input_shape))


def _as_patches(candidates: dict[str, list[Block]]) -> Lowering:
  return {path: PATCHES for path in candidates}


def _parent_and_key(model: nnx.Module, path: str):
  parts = [int(p) if p.isdigit() else p for p in path.split("/")]
  parent = model
  for part in parts[:-1]:
    parent = parent[part] if isinstance(part, int) else getattr(parent, part)
  return parent, parts[-1]


def module_at(model: nnx.Module, path: str) -> nnx.Module:
  """The submodule at a layer path such as 'stages/0/conv1'."""
  parent, key = _parent_and_key(model, path)
  return parent[key] if isinstance(key, int) else getattr(parent, key)


def as_lowering(mapping: Mapping[str, Block | int]) -> Lowering:
  """{path: (rows, cols), cols or PATCHES} -> {path: (rows, cols) or
  PATCHES}."""
  return {path: PATCHES if isinstance(block, str)
          else (1, int(block)) if isinstance(block, (int, np.integer))
          else (int(block[0]), int(block[1])) for path, block in mapping.items()}


def lowered_conv(conv: nnx.Module, input_shape: Sequence[int], block: Block,
                 path: str = "the layer") -> nnx.Module:
  """`conv` (whose input is (*spatial, C) `input_shape`) as a PatchConv or a
  BandedConv of `block`."""
  if isinstance(block, str):
    if not isinstance(conv, nnx.Conv) or not _is_plain_conv(conv):
      raise ValueError(f"{path!r} is not a float conv without dilation or "
                       "groups; only those can run as a patch matmul")
    return PatchConv(conv, input_shape)
  if not isinstance(conv, nnx.Conv) or not _is_plain_2d_conv(conv):
    raise ValueError(f"{path!r} is not a stride-1 float 2D conv; only "
                     f"those can be lowered to a banded matmul")
  return BandedConv(conv, input_shape, block)


def apply_lowering(model: nnx.Module, input_shape: Sequence[int],
                   lowering: Mapping[str, Block | int]) -> nnx.Module:
  """A copy of `model` whose convs named in `lowering` are BandedConvs or
  PatchConvs."""
  if not lowering:
    return model
  shapes = layer_shapes(model, input_shape)
  model = nnx.clone(model)
  for path, block in as_lowering(lowering).items():
    if path not in shapes:
      raise ValueError(f"no conv layer {path!r} in the model; its conv "
                       f"layers are {sorted(candidate_blocks(model, input_shape))}")
    lowered = lowered_conv(module_at(model, path), shapes[path][0][1:],
                           block, path)
    parent, key = _parent_and_key(model, path)
    if isinstance(key, int):
      parent[key] = lowered
    else:
      setattr(parent, key, lowered)
  return model


def median_seconds_in_turns(a: Callable[[], object], b: Callable[[], object],
                           min_calls: int = 5, budget_s: float = 0.5
                           ) -> tuple[float, float]:
  """Median seconds of two blocking calls timed in turns of 5 after 2
  warmups each: at least `min_calls` each, more while the timed seconds
  total under `budget_s` (at most 200). Side by side, a burst of machine
  noise lands on both rather than on whichever ran then."""
  times = time_calls({0: a, 1: b}, min_calls, warmup=2, block=5, settle=1,
                     budget_s=budget_s)
  return float(np.median(times[0])), float(np.median(times[1]))


def choose_lowering(model: nnx.Module, input_shape: Sequence[int],
                    compile_model: Callable[[nnx.Module], Callable[[], object]],
                    time_pair: Callable[[Callable, Callable], tuple[float, float]],
                    margin: float = 0.05) -> tuple[Lowering, list[dict]]:
  """Greedy per layer, in model order: keep a layer's fastest block when the
  whole model runs `margin` faster than with the best choice so far; then
  every conv as patches at once, which can pay where no single layer does
  by `margin`.

  `compile_model(model)` compiles a candidate into a blocking call;
  `time_pair(best, trial)` gives both calls' seconds, timed side by side
  (median_seconds_in_turns): each trial is judged against the choice so
  far in the same run. The trials come back with the choice: the first is
  XLA's convs, then each lowering tried with its seconds and those of the
  choice it was timed `against`. A model without convs is not timed."""
  candidates = candidate_blocks(model, input_shape)
  chosen: Lowering = {}
  best = compile_model(model) if candidates else None
  trials: list[dict] = []

  def consider(trial: Lowering) -> None:
    nonlocal best, chosen
    call = compile_model(apply_lowering(model, input_shape, trial))
    against, seconds = time_pair(best, call)
    if not trials:
      trials.append({"lowering": {}, "seconds": against})
    trials.append({"lowering": trial, "seconds": seconds, "against": against})
    if seconds < against * (1 - margin):
      best, chosen = call, trial

  for path, blocks in candidates.items():
    for block in blocks:
      consider(chosen | {path: block})
  every = _as_patches(candidates)
  if len(candidates) > 1 and chosen != every:
    consider(every)
  return chosen, trials


def parse_lowering(text: str) -> str | Lowering:
  """'xla' | 'auto' | 'conv1:4x4,conv2:1x5,conv3:patches' (layer path:
  rows x cols, a bare number being 1 x cols, or patches) -> CompiledModel's
  conv_lowering."""
  if text in ("xla", "auto"):
    return text
  lowering = {}
  for part in filter(None, text.split(",")):
    path, _, block = part.rpartition(":")
    if path and block == PATCHES:
      lowering[path] = PATCHES
      continue
    sizes = block.split("x") if "x" in block else ["1", block]
    if (not path or len(sizes) != 2
        or not all(s.isdigit() and int(s) >= 1 for s in sizes)):
      raise ValueError(f"bad conv lowering {part!r} in {text!r}: write 'xla', "
                       f"'auto' or layer:ROWSxCOLS or layer:patches pairs "
                       f"such as conv1:4x4,conv2:1x5,conv3:patches")
    lowering[path] = (int(sizes[0]), int(sizes[1]))
  return lowering


def describe(lowering: Mapping[str, Block]) -> str:
  """{'conv1': (4, 4), 'conv2': PATCHES} -> 'conv1:4x4,conv2:patches', the
  form parse_lowering reads."""
  return ",".join(f"{path}:{block}" if isinstance(block, str)
                  else f"{path}:{block[0]}x{block[1]}"
                  for path, block in lowering.items()) or "xla"
