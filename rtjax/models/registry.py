"""Model families by name, so a checkpoint's metadata alone rebuilds its model."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx

from rtjax.errors import ConfigError

# Arguments every family takes from the dataset, never from the user's config.
DATASET_ARGS = ("num_classes", "input_shape")

_REGISTRY: dict[str, type[nnx.Module]] = {}

# Tensor parallelism by parameter path: (path regex, dimension split over the
# mesh's `model` axis counted from the end, or None: replicated). A family
# class may declare its own `tensor_parallel_rules`; by default kernels split
# by output channels. int8 kernels (qwix) are kernel/array/{qvalue,scale}.
KERNEL = r"kernel(/array/(qvalue|scale))?$"
DEFAULT_TENSOR_PARALLEL_RULES: tuple[tuple[str, int | None], ...] = (
    (r"(^|/)" + KERNEL, -1),
    (r"(^|/)bias$", -1),
)


def register(name: str) -> Callable[[type[nnx.Module]], type[nnx.Module]]:
  """Class decorator: makes a model family constructible by `name`. The
  class declares its depth rule, `shallower`, or why it has none,
  `no_shallower` (rtjax.models.depth)."""

  def wrap(cls: type[nnx.Module]) -> type[nnx.Module]:
    if name in _REGISTRY:
      raise ValueError(f"model name {name!r} registered twice")
    if (getattr(cls, "shallower", None) is None) == (
        getattr(cls, "no_shallower", None) is None):
      raise ValueError(f"model family {name!r} must declare exactly one of "
                       "`shallower` (its depth rule) and `no_shallower` (why "
                       "it has none): rtjax.models.depth")
    _REGISTRY[name] = cls
    return cls

  return wrap


def model_names() -> list[str]:
  return sorted(_REGISTRY)


def model_class(name: str) -> type[nnx.Module]:
  if name not in _REGISTRY:
    raise ConfigError(
        f"unknown model {name!r}; known models: {', '.join(model_names())}")
  return _REGISTRY[name]


def model_arg_names(name: str) -> list[str]:
  """Constructor arguments a config may set for family `name`."""
  params = inspect.signature(model_class(name).__init__).parameters
  return [p for p in params
          if p not in ("self", "rngs", *DATASET_ARGS)]


def full_args(cls: type, args: dict) -> dict[str, Any]:
  """`args` completed with the constructor's defaults: a checkpoint's
  metadata holds only the arguments its config set."""
  params = inspect.signature(cls.__init__).parameters
  defaults = {k: p.default for k, p in params.items()
              if p.default is not inspect.Parameter.empty}
  return {**defaults, **args}


def tensor_parallel_rules(model: nnx.Module) -> tuple:
  """The sharding rules `model`'s family declares (or the default)."""
  return getattr(type(model), "tensor_parallel_rules",
                 DEFAULT_TENSOR_PARALLEL_RULES)


def input_dtype(model: nnx.Module):
  """What the model's inputs are: float32 features, or what its family
  declares (`input_dtype`: a decoder's int32 token ids)."""
  return getattr(type(model), "input_dtype", jnp.float32)


def create_model(name: str, args: dict[str, Any], seed: int = 0) -> nnx.Module:
  """Builds family `name` from its full constructor arguments."""
  return model_class(name)(**args, rngs=nnx.Rngs(seed))


def abstract_model(name: str, args: dict[str, Any]) -> nnx.Module:
  """The model's structure with shapes only: no memory, no random init."""
  return nnx.eval_shape(lambda: create_model(name, args))
