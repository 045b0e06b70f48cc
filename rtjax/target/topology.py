"""A TPU slice to compile for, whether or not it is attached.

libtpu (the `[tpu]` extra) describes any Cloud TPU topology to jax as
compile-only devices (jax.experimental.topologies.get_topology_desc): a mesh
over them lowers and compiles with XLA:TPU on this host's CPU, and nothing
can run there. The slice's facts (chips, HBM, published peaks) are
rtjax.accelerators'; the host is readied for libtpu by its `prepare_host`,
which a command calls before jax starts a backend.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from jax.sharding import Mesh

from rtjax import accelerators
from rtjax.errors import FlagError
from rtjax.infer import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class Target:
  """A slice by name ('v5litepod-8', 'tpu:v5e:2x4') and its compile-only
  devices, one per chip."""
  name: str
  accelerator: accelerators.Accelerator
  devices: tuple

  @property
  def chips(self) -> int:
    return len(self.devices)

  @property
  def generation(self) -> accelerators.Generation:
    return self.accelerator.generation

  @property
  def hbm_bytes(self) -> int | None:
    """Published HBM per chip."""
    return self.generation.hbm_bytes

  def mesh(self, batch: int, model: int | None = None) -> Mesh:
    """A (data, model) mesh over every chip for `batch` rows: `model` chips
    per weight split, by default the fewest that let the batch divide over
    the rest (batch 256 on 8 chips: data 8; batch 1: model 8)."""
    if model is None:
      model = self.chips // math.gcd(batch, self.chips)
    if model < 1 or self.chips % model or batch % (self.chips // model):
      raise FlagError(
          f"a model axis of {model} on {self.name} ({self.chips} chips) "
          f"leaves a data axis that {batch} rows do not divide over; give "
          f"a model axis that divides {self.chips} and leaves a data axis "
          f"dividing {batch}")
    return mesh_lib.make_mesh({mesh_lib.DATA: self.chips // model,
                               mesh_lib.MODEL: model}, self.devices)


@functools.cache
def resolve(name: str) -> Target:
  """The slice `name` names (a LaunchError lists the valid names), with
  its devices from libtpu; a FlagError when libtpu is not installed."""
  acc = accelerators.accelerator(name)
  try:
    from jax.experimental import topologies
    devices = topologies.get_topology_desc(**acc.topology_desc_args).devices
  # Without libtpu jax has no TPU topology to describe: it raises one of
  # these, depending on how far its plugin lookup got.
  except (ImportError, RuntimeError, NotImplementedError) as e:
    raise FlagError(
        f"compiling for {name} needs libtpu, which describes TPU slices "
        f"to XLA ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
        "install the [tpu] extra: pip install -e '.[tpu]'") from None
  return Target(name, acc, tuple(devices))

