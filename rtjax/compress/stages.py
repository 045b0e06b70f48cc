"""The keys each pipeline stage type takes, with defaults (the config contract
of `config.stage.<name>`); `stage_config` builds one for a config file."""

from __future__ import annotations

import ml_collections

COMMON = {
    "type": "",
    "parent": "",  # stage whose checkpoint this one starts from; default: previous
    "train": {},  # overrides of config.train for this stage (same keys)
}

STAGE_TYPES = {
    # Plain training; `model` (name, args) overrides config.model if set.
    "train": {"model": {}},
    # Unstructured magnitude pruning (Zhu & Gupta schedule) or N:M sparsity.
    "prune": {"method": "magnitude", "target_sparsity": 0.8,
              "initial_sparsity": 0.0, "begin_step": 0, "end_step": 0,
              "update_every": 50, "scope": "global", "include": "kernel$",
              "exclude": "", "n": 2, "m": 4},
    # Remove units (filters, dense units, heads); emits a smaller model.
    "structured_prune": {"keep_fraction": 0.5, "criterion": "l2",
                         "round_to": 1, "groups": ".*"},
    # Train `model` from scratch against the parent (teacher).
    "distill": {"model": {}, "alpha": 0.7, "temperature": 4.0},
    # Quantization-aware fine-tuning with qwix (QtProvider).
    "qat": {"scheme": "w8a8", "module_path": ".*"},
    # int8 serving model (PtqProvider + quantize_params); no training.
    "int8": {"scheme": "", "module_path": ".*", "static_activations": False,
             "calibration_batches": 8},
}

PRUNE_METHODS = ("magnitude", "n_m")
SCOPES = ("global", "layer")


def stage_config(type: str, **values) -> ml_collections.ConfigDict:
  """A stage section with every key of its type, so command-line overrides
  such as --config.stage.prune.target_sparsity=0.9 work."""
  if type not in STAGE_TYPES:
    raise ValueError(f"unknown stage type {type!r}; known: "
                     f"{', '.join(STAGE_TYPES)}")
  merged = {**COMMON, **STAGE_TYPES[type], **values, "type": type}
  unknown = set(merged) - set(COMMON) - set(STAGE_TYPES[type])
  if unknown:
    raise ValueError(f"stage type {type!r} has no key(s) {sorted(unknown)}; "
                     f"its keys: {sorted(set(COMMON) | set(STAGE_TYPES[type]))}")
  return ml_collections.ConfigDict(merged)
