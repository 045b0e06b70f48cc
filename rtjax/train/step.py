"""One optimizer step, as a module-level jitted function.

The loss is supplied by whoever trains: plain training uses CrossEntropy,
distillation its own loss (rtjax.compress.distill). A loss is a hashable
callable `loss(logits, labels, images, loss_state) -> per-example losses`;
`loss_state` carries arrays it needs (a teacher's weights), so the compiled
step is reused across calls.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
  """Softmax cross-entropy against (optionally smoothed) one-hot labels."""
  num_classes: int
  label_smoothing: float = 0.0

  def __call__(self, logits, labels, images=None, loss_state=None):
    del images, loss_state
    targets = optax.smooth_labels(jax.nn.one_hot(labels, self.num_classes),
                                  self.label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               loss, metrics_graphdef: nnx.GraphDef, params, rest, opt_state,
               metrics, images, labels, loss_state=None):
  """-> (params, rest, opt_state, metrics): `rest` is the non-parameter
  state (BatchNorm statistics) the forward pass updates; `metrics` is the
  state of the TrainMetrics window (an nnx.MultiMetric), updated on device."""
  def objective(params):
    model = nnx.merge(graphdef, params, rest, copy=True)
    logits = model(images)
    value = loss(logits, labels, images, loss_state).mean()
    return value, (nnx.split(model, nnx.Param, ...)[2], logits)

  (value, (rest, logits)), grads = jax.value_and_grad(
      objective, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  window = nnx.merge(metrics_graphdef, metrics)
  window.update(loss=value, grad_norm=optax.tree.norm(grads),
                accuracy=jnp.mean(jnp.argmax(logits, -1) == labels))
  return params, rest, opt_state, nnx.state(window)
