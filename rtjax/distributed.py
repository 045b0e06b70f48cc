"""Multi-process JAX set-up: Cloud TPU pods, or explicit processes elsewhere."""

from __future__ import annotations

import jax
from absl import logging

from rtjax.errors import FlagError


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """`jax.distributed.initialize` for this process.

  With no arguments JAX detects the cluster itself (Cloud TPU VMs and pod
  slices). Elsewhere give all three; CPU processes exchange collectives over
  gloo. Call before anything touches a device.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit) and None in explicit:
    raise FlagError("multi-process runs need coordinator_address, "
                     "num_processes and process_id together (or none of them "
                     f"on Cloud TPU); got {explicit}")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address is None:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  logging.info("process %d of %d; %d local of %d devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
