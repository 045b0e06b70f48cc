"""Compression stages: pruning (unstructured, N:M, structured), distillation,
quantization (qwix QAT and int8 serving), chained by a config's `stages`."""
