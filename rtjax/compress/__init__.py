"""Compression transforms: pruning masks (unstructured, N:M) as optax
wrappers, structured shrinking, the distillation loss, int8 conversion with
qwix. The pipeline (rtjax.pipeline) chains them as stages."""
