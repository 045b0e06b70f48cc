"""Conv lowerings for serving: XLA's own convolution, or the same conv as one
banded (block-Toeplitz) matmul, chosen per layer and batch by measuring.

XLA's CPU convolution runs few-channel layers slowly (LeNet-5's 3 -> 6 first
conv: about 11 GFLOP/s, on one core), while its matmuls run on every core at
roughly 200 GFLOP/s. A stride-1 conv is a matmul over windows of input rows:
`block` output columns at a time, the kernel rows' (block + kw - 1)-wide input
windows times a banded matrix that holds the kernel once per output column.
That costs (block + kw - 1) / kw times the conv's FLOPs and a copy of the
windows, so whether it wins depends on the layer, the batch size and the
machine: `choose_lowerings` times the candidates on the hardware at hand.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rtjax.models.stats import layer_shapes

# At most this many times the conv's FLOPs: wider blocks are never faster.
MAX_FLOP_INFLATION = 4.0
# Banded matrices above this many float32 entries (16 MB) are not tried.
MAX_MATRIX_ENTRIES = 4 * 2**20

Lowering = dict[str, int]  # conv layer path -> block (layers absent: XLA conv)


def _explicit_padding(conv: nnx.Conv, spatial: Sequence[int]):
  padding = conv.padding
  if isinstance(padding, str):
    if padding.upper() not in ("VALID", "SAME"):
      return None
    return jax.lax.padtype_to_pads(spatial, conv.kernel_size, (1, 1),
                                   padding.upper())
  try:
    return [tuple(p) for p in nnx.nn.linear.canonicalize_padding(padding, 2)]
  except (ValueError, TypeError):
    return None


def _all_ones(value) -> bool:
  return value is None or all(v == 1 for v in np.atleast_1d(value))


def _is_plain_2d_conv(conv: nnx.Conv) -> bool:
  kernel = conv.kernel[...]
  return (len(conv.kernel_size) == 2 and _all_ones(conv.strides)
          and _all_ones(conv.input_dilation) and _all_ones(conv.kernel_dilation)
          and conv.feature_group_count == 1 and conv.mask is None
          and conv.conv_general_dilated is jax.lax.conv_general_dilated
          and isinstance(kernel, jax.Array)  # not an int8 (qwix) kernel
          and kernel.dtype == jnp.float32 and conv.dtype in (None, jnp.float32))


def banded_matrix(kernel: np.ndarray, block: int) -> np.ndarray:
  """(kh, kw, C, F) kernel -> (kh * (block + kw - 1) * C, block * F) matrix:
  row (i, w, c), column (x, f) holds kernel[i, w - x, c, f] where in range."""
  kh, kw, channels, features = kernel.shape
  window = block + kw - 1
  matrix = np.zeros((kh, window, channels, block, features), kernel.dtype)
  for x in range(block):
    matrix[:, x:x + kw, :, x, :] = kernel
  return matrix.reshape(kh * window * channels, block * features)


class BandedConv(nnx.Module):
  """A stride-1 nnx.Conv computed as one banded matmul (same outputs)."""

  def __init__(self, conv: nnx.Conv, input_shape: Sequence[int], block: int):
    """`input_shape`: the conv's (H, W, C) input; `block`: output columns per
    matmul row, a divisor of the output width."""
    height, width, _ = input_shape
    self.pads = _explicit_padding(conv, (height, width))
    (top, bottom), (left, right) = self.pads
    out_width = width + left + right - conv.kernel_size[1] + 1
    if out_width % block:
      raise ValueError(f"block {block} does not divide the conv's output "
                       f"width {out_width}")
    self.kernel_size = tuple(conv.kernel_size)
    self.features = conv.out_features
    self.block = block
    self.matrix = nnx.Param(jnp.asarray(
        banded_matrix(np.asarray(conv.kernel[...]), block)))
    self.bias = (nnx.Param(conv.bias[...]) if conv.bias is not None
                 else nnx.data(None))

  def __call__(self, x: jax.Array) -> jax.Array:
    (top, bottom), (left, right) = self.pads
    if top or bottom or left or right:
      x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    kh, kw = self.kernel_size
    batch, height, width, channels = x.shape
    out_h, out_w = height - kh + 1, width - kw + 1
    window = self.block + kw - 1
    rows = jnp.stack([x[:, i:i + out_h] for i in range(kh)], axis=2)
    windows = jnp.stack(  # (batch, out_h, blocks, kh, window, channels)
        [rows[:, :, :, start:start + window]
         for start in range(0, out_w, self.block)], axis=2)
    y = windows.reshape(-1, kh * window * channels) @ self.matrix[...]
    y = y.reshape(batch, out_h, out_w, self.features)
    return y + self.bias[...] if self.bias is not None else y


def candidate_blocks(model: nnx.Module,
                     input_shape: Sequence[int]) -> dict[str, list[int]]:
  """Per stride-1 float conv layer path: the blocks worth timing."""
  shapes = layer_shapes(model, input_shape)
  candidates = {}
  for path, module in nnx.iter_graph(model):
    name = "/".join(map(str, path))
    if (not isinstance(module, nnx.Conv) or name not in shapes
        or not _is_plain_2d_conv(module)):
      continue
    (_, height, width, _), _ = shapes[name]
    pads = _explicit_padding(module, (height, width))
    if pads is None:
      continue
    kh, kw = module.kernel_size
    out_w = width + sum(pads[1]) - kw + 1
    entries = lambda b: kh * (b + kw - 1) * module.in_features * b * module.out_features
    blocks = [b for b in range(2, out_w + 1) if out_w % b == 0
              and (b + kw - 1) / kw <= MAX_FLOP_INFLATION
              and entries(b) <= MAX_MATRIX_ENTRIES]
    if blocks:
      candidates[name] = blocks
  return candidates


def _parent_and_key(model: nnx.Module, path: str):
  parts = [int(p) if p.isdigit() else p for p in path.split("/")]
  parent = model
  for part in parts[:-1]:
    parent = parent[part] if isinstance(part, int) else getattr(parent, part)
  return parent, parts[-1]


def apply_lowering(model: nnx.Module, input_shape: Sequence[int],
                   lowering: Mapping[str, int]) -> nnx.Module:
  """A copy of `model` whose convs named in `lowering` are BandedConvs."""
  if not lowering:
    return model
  shapes = layer_shapes(model, input_shape)
  model = nnx.clone(model)
  for path, block in lowering.items():
    if path not in shapes:
      raise ValueError(f"no conv layer {path!r} in the model; its conv "
                       f"layers are {sorted(candidate_blocks(model, input_shape))}")
    parent, key = _parent_and_key(model, path)
    conv = parent[key] if isinstance(key, int) else getattr(parent, key)
    if not isinstance(conv, nnx.Conv) or not _is_plain_2d_conv(conv):
      raise ValueError(f"{path!r} is not a stride-1 float 2D conv; only "
                       f"those can be lowered to a banded matmul")
    banded = BandedConv(conv, shapes[path][0][1:], int(block))
    if isinstance(key, int):
      parent[key] = banded
    else:
      setattr(parent, key, banded)
  return model


def median_seconds(call: Callable[[], jax.Array], min_calls: int = 5,
                   budget_s: float = 0.25) -> float:
  """Median of timed calls: at least `min_calls`, more while within budget."""
  for _ in range(2):
    call().block_until_ready()
  times, spent = [], 0.0
  while len(times) < min_calls or (spent < budget_s and len(times) < 200):
    start = time.perf_counter()
    call().block_until_ready()
    times.append(time.perf_counter() - start)
    spent += times[-1]
  return float(np.median(times))


def choose_lowering(model: nnx.Module, input_shape: Sequence[int],
                    time_model: Callable[[nnx.Module], float],
                    margin: float = 0.05) -> tuple[Lowering, list[dict]]:
  """Greedy per layer, in model order: keep a layer's fastest block when the
  whole model runs `margin` faster than with the best choice so far.

  `time_model(model) -> seconds` compiles and times one candidate; the trials
  (lowering tried, seconds) come back with the choice."""
  chosen: Lowering = {}
  best = time_model(model)
  trials = [{"lowering": {}, "seconds": best}]
  for path, blocks in candidate_blocks(model, input_shape).items():
    for block in blocks:
      trial = chosen | {path: block}
      seconds = time_model(apply_lowering(model, input_shape, trial))
      trials.append({"lowering": trial, "seconds": seconds})
      if seconds < best * (1 - margin):
        best, chosen = seconds, trial
  return chosen, trials


def parse_lowering(text: str) -> str | Lowering:
  """'xla' | 'auto' | 'conv1:4,conv2:2' (layer path: block) -> CompiledModel's
  conv_lowering."""
  if text in ("xla", "auto"):
    return text
  lowering = {}
  for part in filter(None, text.split(",")):
    path, _, block = part.rpartition(":")
    if not path or not block.isdigit() or int(block) < 1:
      raise ValueError(f"bad conv lowering {part!r} in {text!r}: write 'xla', "
                       f"'auto' or layer:block pairs such as conv1:4,conv2:2")
    lowering[path] = int(block)
  return lowering
