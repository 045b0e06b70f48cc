"""rtjax's command-line entry points (absl flags and wiring only).

Importing the package readies this host for libtpu before any command starts
a jax backend (rtjax.accelerators.prepare_host): where the `[tpu]` extra is
installed and no TPU is attached, jax then skips the metadata server and the
TPU's failed start quietly, and a TPU worker is left as it is.
"""

from rtjax import accelerators

accelerators.prepare_host(cpu_only=False)
