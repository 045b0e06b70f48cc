"""Flax NNX model families, constructible by name."""

# Importing the family modules registers them.
from rtjax.models import lenet, resnet, vit  # noqa: F401
from rtjax.models import cnn1d, mlp, recurrent, transformer1d  # noqa: F401
from rtjax.models import decoder  # noqa: F401
from rtjax.models.depth import (block_count, drop_blocks, droppable_blocks,
                                no_shallower_reason, shallower)
from rtjax.models.modes import inference_view, training_view
from rtjax.models.registry import (DATASET_ARGS, abstract_model, create_model,
                                   input_dtype, model_arg_names, model_class,
                                   model_names)
from rtjax.models.stats import cost_analysis, forward_flops, param_count

__all__ = [
    "DATASET_ARGS", "abstract_model", "block_count", "cost_analysis", "create_model",
    "drop_blocks", "droppable_blocks", "forward_flops", "inference_view", "input_dtype", "model_arg_names", "model_class",
    "model_names", "no_shallower_reason", "param_count", "shallower",
    "training_view",
]
