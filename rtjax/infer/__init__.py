"""Serving: compiled inference from a checkpoint, meshes and shardings, export."""

from rtjax.infer.compiled import DEFAULT_BATCH_SIZES, CompiledModel
from rtjax.infer.fold import fold_batchnorm
from rtjax.infer.mesh import make_mesh, parse_mesh, weight_shardings

__all__ = ["CompiledModel", "DEFAULT_BATCH_SIZES", "fold_batchnorm",
           "make_mesh", "parse_mesh", "weight_shardings"]
