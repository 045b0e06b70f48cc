"""GRU and LSTM sequence classifiers built from flax's cells (nnx.GRUCell,
nnx.OptimizedLSTMCell), one or more layers, optionally bidirectional.

The recurrence is a Python loop over the time steps (unrolled at trace time),
not nnx.RNN, because every later step needs plain ops:
- quantization: qwix's PTQ conversion fails on nnx.RNN's scan, while the same
  cells called in a loop are ordinary Linear layers it quantizes;
- export: jax2onnx fails on nnx.RNN; the unrolled graph is matmuls and
  elementwise ops it converts;
- checkpoints: nnx.RNN keeps an RNG state, which would land in every
  checkpoint; here the state is parameters only and the initial carry is
  zeros (`initial_carry`);
- cost: XLA's cost analysis counts a scan's body once, so forward_flops
  would report a 40-step model as one step; unrolled, it counts every step.
The price is compile time linear in steps x layers x directions: 19 s for
the gradient of a 32-unit GRU over 40 steps here, against 0.9 s as a
jax.lax.scan, which also ran each step 2.8x faster. So the training view
(`rtjax.models.training_view`, `scan_steps=True`) runs the same cells in a
scan; serving, quantization, export and FLOP counts see the loop. A
streaming server runs `step` once per sample instead.

The paper's GRUBase (greydanus/mnist1d, notebooks/models.py) is a
bidirectional GRU of 6 hidden units whose 40 outputs (2 x 6 each) are
flattened into one Linear: the defaults (head='all'). flax's GRUCell has
one bias vector where torch has two, so 18 fewer parameters per direction
(5098 in all, torch 5134); of torch's second vector only b_hn, inside
r * (W_hn h + b_hn), is not redundant. The LSTM takes the same defaults.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rtjax.models.groups import Axis, Group
from rtjax.models.registry import full_args, register

HEADS = ("all", "last")


class _Recurrent(nnx.Module):
  """Layers of `cell_type` (both directions when bidirectional), then a
  Linear over the top layer's outputs: all steps flattened (time-major,
  directions inner, as torch) or the final states (the last step forward,
  the first step backward)."""

  # Set by each family: the flax cell, the number of gate blocks packed
  # (gate-major) in its kernels, which of its Linears holds the biases and
  # how many arrays its state holds.
  cell_type = gates = biased = carry_arrays = None

  def __init__(self,
               num_classes: int,
               input_shape: Sequence[int],
               hidden: Sequence[int] = (6,),
               bidirectional: bool = True,
               head: str = "all",
               *,
               rngs: nnx.Rngs):
    """`hidden`: units per layer; `head`: 'all' (the paper's Linear over
    every step's output) or 'last' (the final state: what a streaming
    server reads after each step). Inputs are (batch, steps, features)."""
    steps, features = input_shape
    if head not in HEADS:
      raise ValueError(f"{type(self).__name__.lower()}: head must be one of "
                       f"{HEADS}, got {head!r}")
    if not hidden:
      raise ValueError("recurrent models need at least one layer in hidden")
    directions = 2 if bidirectional else 1
    cells, reverse, width = [], [], features
    for h in hidden:
      cells.append(self.cell_type(width, int(h), rngs=rngs))
      if bidirectional:
        reverse.append(self.cell_type(width, int(h), rngs=rngs))
      width = directions * int(h)
    self.cells = nnx.List(cells)
    self.reverse_cells = nnx.List(reverse) if bidirectional else None
    self.head_kind = head
    self.scan_steps = False  # set by the training view (module docstring)
    self.head = nnx.Linear(width * (steps if head == "all" else 1),
                           num_classes, rngs=rngs)

  def set_view(self, scan_steps: bool | None = None):
    """nnx.view hook: `scan_steps` runs the recurrence as a jax.lax.scan."""
    if scan_steps is not None:
      self.scan_steps = scan_steps

  # ---- streaming: one step at a time (unidirectional only) ----------------

  def stream_refusal(self) -> str | None:
    """Why this model cannot be streamed a step at a time, or None."""
    if self.reverse_cells is not None:
      return ("a bidirectional model needs the whole sequence; train it with "
              "bidirectional=False to stream it")
    if self.head_kind != "last":
      return ("its head reads every step's output at once; train it with "
              "head='last' to stream it")
    return None

  def initial_carry(self, batch: int) -> tuple:
    """Zero states, one per layer: what the full forward starts from."""
    return tuple(self._zeros(batch, cell.hidden_features)
                 for cell in self.cells)

  def step(self, carry: tuple, x_t: jnp.ndarray) -> tuple[tuple, jnp.ndarray]:
    """One time step through every layer: (new carry, top layer's output
    (batch, hidden[-1])). Feed the collected outputs to `readout`."""
    if self.reverse_cells is not None:
      raise ValueError("step streams a unidirectional model; a bidirectional "
                       "one needs the whole sequence")
    new, x_t = [], jnp.asarray(x_t)
    for cell, c in zip(self.cells, carry):
      c, x_t = cell(c, x_t)
      new.append(c)
    return tuple(new), x_t

  def readout(self, outputs: Sequence[jnp.ndarray]) -> jnp.ndarray:
    """Logits from the top layer's per-step outputs, in time order (every
    step for head='all'; for head='last', any prefix of them)."""
    if self.head_kind == "all":
      return self.head(jnp.concatenate(outputs, axis=-1))
    last = outputs[-1]
    if self.reverse_cells is not None:  # backward's final state is at step 0
      half = self.cells[-1].hidden_features
      last = jnp.concatenate([last[:, :half], outputs[0][:, half:]], axis=-1)
    return self.head(last)

  # ---- the full sequence ----------------------------------------------------

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = jnp.asarray(x)  # qwix's int8 Linear without bias needs a jax input
    xs = [x[:, t] for t in range(x.shape[1])]
    for i, cell in enumerate(self.cells):
      outs = self._unroll(cell, xs, reverse=False)
      if self.reverse_cells is not None:
        back = self._unroll(self.reverse_cells[i], xs, reverse=True)
        outs = [jnp.concatenate([f, b], axis=-1) for f, b in zip(outs, back)]
      xs = outs
    return self.readout(xs)

  def _unroll(self, cell, xs: list, reverse: bool) -> list:
    """The cell over the steps: a Python loop, or a scan in the training
    view (see the module docstring); outputs in input order either way."""
    carry = self._zeros(xs[0].shape[0], cell.hidden_features)
    if self.scan_steps:
      graphdef, state = nnx.split(cell)
      def body(carry, x_t):
        return nnx.merge(graphdef, state)(carry, x_t)
      _, outs = jax.lax.scan(body, carry, jnp.stack(xs), reverse=reverse)
      return list(outs)
    outs = [None] * len(xs)
    for t in (reversed(range(len(xs))) if reverse else range(len(xs))):
      carry, outs[t] = cell(carry, xs[t])
    return outs

  def _zeros(self, batch: int, width: int) -> Any:
    """The zero state of one cell: one array (GRU) or (c, h) (LSTM)."""
    zeros = jnp.zeros((batch, width), jnp.float32)
    return zeros if self.carry_arrays == 1 else (zeros,) * self.carry_arrays

  # ---- structured pruning -----------------------------------------------

  @classmethod
  def prunable_groups(cls, args: dict) -> list[Group]:
    """One group per layer: unit j of both directions (their widths are one
    argument). Its axes: its column in every gate block of the input and
    recurrent kernels and of the gate bias (tiles=gates: flax packs gates
    gate-major), its row of the recurrent kernel, and its rows in the next
    layer's input kernels (tiles=directions) or in the head (tiles=
    directions, times steps for head='all').

    Producers rank units by their *outgoing* weights: the recurrent kernel's
    row (into every gate) and, where that axis is untiled, the next layer's
    or the head's rows. A unit whose outgoing weights are zero is read by no
    one, so it ranks lowest and removing it changes no output. Gate columns
    (the weights producing the unit) are sliced but not ranked:
    rtjax.compress.structured scores a producer axis as contiguous blocks and
    ignores `tiles`, so a gate-major axis would mix units' scores."""
    args = full_args(cls, args)
    hidden = [int(h) for h in args["hidden"]]
    steps = args["input_shape"][0]
    directions = 2 if args["bidirectional"] else 1
    stacks = ("cells", "reverse_cells")[:directions]
    g = cls.gates
    groups = []
    for i, width in enumerate(hidden):
      axes, producers = [], []
      for stack in stacks:
        p = f"{stack}/{i}"
        axes += [Axis(f"{p}/dense_i/kernel", 1, tiles=g),
                 Axis(f"{p}/dense_h/kernel", 1, tiles=g),
                 Axis(f"{p}/{cls.biased}/bias", 0, tiles=g),
                 Axis(f"{p}/dense_h/kernel", 0)]
        producers.append(Axis(f"{p}/dense_h/kernel", 0))
      if i + 1 < len(hidden):
        outgoing = [Axis(f"{stack}/{i + 1}/dense_i/kernel", 0,
                         tiles=directions) for stack in stacks]
      else:
        tiles = directions * (steps if args["head"] == "all" else 1)
        outgoing = [Axis("head/kernel", 0, tiles=tiles)]
      axes += outgoing
      producers += [a for a in outgoing if a.tiles == 1]
      groups.append(Group(f"layer{i}", width, axes, producers))
    return groups

  @classmethod
  def with_widths(cls, args: dict, widths: dict) -> dict:
    depth = len(full_args(cls, args)["hidden"])
    return {**args, "hidden": [widths[f"layer{i}"] for i in range(depth)]}

  # ---- depth (rtjax.models.depth) ----------------------------------------

  @staticmethod
  def shallower(args: dict) -> list[dict]:
    """The last stacked layer removed."""
    hidden = list(args["hidden"])
    return [{**args, "hidden": hidden[:-1]}] if len(hidden) > 1 else []

  block_stacks = ("cells", "reverse_cells")

  @staticmethod
  def droppable_blocks(args: dict) -> list[int]:
    """Stacked layers as wide as the one below: the next layer (or the
    head) reads the same width without them."""
    hidden = [int(h) for h in args["hidden"]]
    return [i for i in range(1, len(hidden)) if hidden[i] == hidden[i - 1]]

  @staticmethod
  def without_blocks(args: dict, drop) -> dict:
    return {**args, "hidden": [h for i, h in enumerate(args["hidden"])
                               if i not in set(drop)]}


@register("gru")
class GRU(_Recurrent):
  """nnx.GRUCell layers: gates r, z, n; bias on the input kernel only."""

  cell_type = nnx.GRUCell
  gates = 3
  biased = "dense_i"
  carry_arrays = 1


@register("lstm")
class LSTM(_Recurrent):
  """nnx.OptimizedLSTMCell layers: gates i, f, g, o packed in one kernel
  each for input and state (two matmuls a step); bias on the state kernel."""

  cell_type = nnx.OptimizedLSTMCell
  gates = 4
  biased = "dense_h"
  carry_arrays = 2  # (cell state c, output h)

