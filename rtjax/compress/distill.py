"""Knowledge distillation's loss (Hinton et al., 2015): the student matches
the teacher's softened logits, mixed with the hard-label loss.

  loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + (1 - alpha) * hard(student, labels)
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import optax
from flax import nnx


# rtjax's default mix: mostly the teacher's soft targets, softened enough
# that its ranking of the wrong classes carries information.
ALPHA, TEMPERATURE = 0.7, 4.0


@dataclasses.dataclass(frozen=True)
class DistillationLoss:
  """A training loss (rtjax.train.step's contract) whose `loss_state` is the
  frozen teacher's state; `teacher` is its graphdef."""
  teacher: nnx.GraphDef
  alpha: float
  temperature: float
  hard: Callable

  def __call__(self, logits, labels, images, teacher_state):
    t = self.temperature
    teacher_logits = jax.lax.stop_gradient(
        nnx.merge(self.teacher, teacher_state)(images))
    kl = optax.kl_divergence(jax.nn.log_softmax(logits / t),
                             jax.nn.softmax(teacher_logits / t))
    hard = self.hard(logits, labels)
    return self.alpha * t * t * kl + (1 - self.alpha) * hard
