"""Cloud TPU accelerator facts, in one place.

What a slice named the way `gcloud` names it (`v5litepod-8`, `v4-32`), or by
its topology (`tpu:v5e:2x4`), is made of: its generation, chips, hosts and the
topology libtpu compiles for; and each generation's chip: HBM, MXU shape,
tensor cores, and the peak rates Google publishes, with the Cloud TPU page
that publishes them. The launch plan (`rtjax.tpu`), the roofline
(`rtjax.bench.breakdown`) and compiling for a slice that is not attached read
it; nothing else restates a fact kept here.

`prepare_host` is the one place that readies a host with no TPU attached for
libtpu (the `[tpu]` extra): no wait on the GCE metadata server, no TPU errors
in the log, and, for a CPU run or a compile for a target, no TPU backend.

    acc = accelerator("v5litepod-8")      # or "tpu:v5e:2x4"
    acc.chips, acc.hosts, acc.generation.hbm_bytes
    prepare_host(cpu_only=True)           # before jax starts a backend
    jax.experimental.topologies.get_topology_desc(**acc.topology_desc_args)
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import pathlib
import re
import sys
from typing import Mapping

from rtjax import errors

GIB = 2 ** 30

# Every slice larger than one host is made of 4-chip hosts (TPU VMs; gcloud's
# workers): the ct5lp-hightpu-4t, ct6e-standard-4t, ct4p-hightpu-4t and
# ct5p-hightpu-4t machine types (xpk's system_characteristics.py:
# `chips_per_vm = 1 if total_chips == 1 else 4`; the v5p page's table: 2x2x2,
# 8 chips, 2 hosts). One host holds up to `Generation.single_host_chips`.
MULTI_HOST_CHIPS_PER_HOST = 4

# (sublanes, lanes) of one tile of a 2-D array in TPU memory, per dtype: XLA:TPU
# lays out f32 as T(8,128), bf16 as T(8,128)(2,1) and int8 as T(8,128)(4,1),
# i.e. 2 and 4 rows packed per 32-bit sublane, on v4, v5e, v5p and v6e alike
# (read from executables compiled by libtpu 0.0.42; tests/test_accelerators.py
# reads them again where libtpu is installed). An array's last dimension lands
# on lanes, its second last on sublanes; a dimension not a multiple is padded.
TILES = {"float32": (8, 128), "bfloat16": (16, 128), "int8": (32, 128)}

# The published per-chip figures of a Generation, each None where its page
# publishes none (Generation.unpublished says why).
FIGURES = ("hbm_bytes", "bf16_flops_per_s", "int8_ops_per_s",
           "hbm_bytes_per_s", "ici_bytes_per_s")


@dataclasses.dataclass(frozen=True)
class Generation:
  """One TPU generation: its chip, and how its slices are named and hosted.

  Figures are per chip, as published on `source` (a Cloud TPU docs page):
  dense bf16 FLOP/s, int8 OP/s, HBM capacity in bytes and bandwidth in
  bytes/s, and ICI bandwidth in bytes/s, bidirectional.
  """
  name: str               # e.g. "v5e"
  type_prefix: str        # gcloud accelerator types are "<type_prefix>-<N>"
  topology_prefix: str    # libtpu topology names are "<topology_prefix>:<shape>"
  device_kind: str        # jax's Device.device_kind for this chip
  runtime_version: str    # TPU software version (gcloud --version) for JAX
  cores_per_chip: int     # TensorCores; jax sees one device per chip
  type_counts_cores: bool  # v4, v5p: N in "<type_prefix>-N" counts TensorCores
  chip_config: str        # get_topology_desc's chip_config_name
  single_host_chips: int  # the largest slice on one host
  shapes: tuple[str, ...]  # slice topologies offered, e.g. "2x4"
  mxu: tuple[int, int]    # one matrix unit's multiply-accumulate array
  source: str
  hbm_bytes: int | None
  bf16_flops_per_s: float | None
  int8_ops_per_s: float | None
  hbm_bytes_per_s: float | None
  ici_bytes_per_s: float | None
  unpublished: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def size(self, shape: str) -> int:
    """The N of the accelerator type "<type_prefix>-N" with this topology."""
    return _chips(shape) * (self.cores_per_chip if self.type_counts_cores else 1)


# https://cloud.google.com/tpu/docs/runtimes lists the software versions; the
# topologies are MaxText's accelerator_to_spec_map.py (v4, v5e, v6e) and the
# v5p page's table (plus 2x2x4, which MaxText and xpk list too).
GENERATIONS = (
    Generation(
        name="v4", type_prefix="v4", topology_prefix="v4",
        device_kind="TPU v4", runtime_version="tpu-ubuntu2204-base",
        cores_per_chip=2, type_counts_cores=True, chip_config="megacore",
        single_host_chips=4,
        shapes=("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8",
                "4x4x12", "4x8x8", "8x8x8", "8x8x12", "8x8x16", "8x16x16"),
        # The Cloud TPU system-architecture page: "An MXU is composed of
        # 128 x 128 multiply-accumulators" (v4, v5e and v5p alike).
        mxu=(128, 128), source="https://cloud.google.com/tpu/docs/v4",
        hbm_bytes=32 * GIB,  # "32 GiB"
        bf16_flops_per_s=275e12, int8_ops_per_s=275e12,  # "275 (bf16 or int8)"
        hbm_bytes_per_s=1200e9, ici_bytes_per_s=None,
        unpublished={"ici_bytes_per_s": "the v4 page gives only pod-level "
                                        "all-reduce and bisection bandwidths"}),
    Generation(
        name="v5e", type_prefix="v5litepod", topology_prefix="v5e",
        device_kind="TPU v5 lite", runtime_version="v2-alpha-tpuv5-lite",
        cores_per_chip=1, type_counts_cores=False, chip_config="default",
        single_host_chips=8,
        shapes=("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
        mxu=(128, 128), source="https://cloud.google.com/tpu/docs/v5e",
        hbm_bytes=16 * GIB,  # "16 GiB" (earlier revisions: "16 GB")
        bf16_flops_per_s=197e12, int8_ops_per_s=393e12,
        hbm_bytes_per_s=819e9, ici_bytes_per_s=400e9),
    Generation(
        name="v5p", type_prefix="v5p", topology_prefix="v5p",
        device_kind="TPU v5", runtime_version="v2-alpha-tpuv5",
        cores_per_chip=2, type_counts_cores=True, chip_config="megacore",
        single_host_chips=4,
        shapes=("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8",
                "8x8x8", "8x8x16", "8x16x16", "16x16x16", "16x16x24"),
        mxu=(128, 128), source="https://cloud.google.com/tpu/docs/v5p",
        # "95 GB": binary, as capacities are (XLA:TPU offers 95.74 GiB).
        hbm_bytes=95 * GIB, bf16_flops_per_s=459e12, int8_ops_per_s=None,
        hbm_bytes_per_s=2765e9,
        # "Bidirectional ICI bandwidth (per chip): 1200 GBps" (earlier
        # revisions: "Interchip Interconnect BW 4800 Gbps", one direction).
        ici_bytes_per_s=1200e9,
        unpublished={"int8_ops_per_s": "the v5p page publishes bf16 only"}),
    Generation(
        name="v6e", type_prefix="v6e", topology_prefix="v6e",
        device_kind="TPU v6 lite", runtime_version="v2-alpha-tpuv6e",
        cores_per_chip=1, type_counts_cores=False, chip_config="default",
        single_host_chips=8,
        shapes=("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
        # "two 256x256 matrix-multiply units (MXU)"
        mxu=(256, 256), source="https://cloud.google.com/tpu/docs/v6e",
        hbm_bytes=32 * GIB,  # "32 GB": binary (XLA:TPU offers 31.25 GiB)
        bf16_flops_per_s=918e12, int8_ops_per_s=1836e12,
        hbm_bytes_per_s=1638e9, ici_bytes_per_s=800e9),
)


def _chips(shape: str) -> int:
  return math.prod(int(d) for d in shape.split("x"))


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One slice: a generation's topology, as gcloud creates it."""
  generation: Generation
  shape: str  # e.g. "2x4"

  @property
  def type_name(self) -> str:
    """The accelerator type as gcloud spells it, e.g. "v5litepod-8"."""
    return f"{self.generation.type_prefix}-{self.generation.size(self.shape)}"

  @property
  def topology_name(self) -> str:
    """The name libtpu's get_topology_desc takes, e.g. "v5e:2x4"."""
    return f"{self.generation.topology_prefix}:{self.shape}"

  @property
  def chips(self) -> int:
    return _chips(self.shape)

  @property
  def hosts(self) -> int:
    """TPU VMs in the slice (gcloud's workers): one runs the experiment each."""
    if self.chips <= self.generation.single_host_chips:
      return 1
    return self.chips // MULTI_HOST_CHIPS_PER_HOST

  @property
  def chips_per_host(self) -> int:
    return self.chips // self.hosts

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    """The chips of one host along each topology axis."""
    if self.hosts == 1:
      dims = [int(d) for d in self.shape.split("x")]
      return tuple(dims + [1] * (3 - len(dims)))
    return (2, 2, 1)

  @property
  def topology_desc_args(self) -> dict:
    """Keyword arguments of jax.experimental.topologies.get_topology_desc
    that describe this slice (one jax device per chip)."""
    return {"platform": "tpu", "topology_name": self.topology_name,
            "chip_config_name": self.generation.chip_config,
            "chips_per_host_bounds": self.chips_per_host_bounds}


ACCELERATORS = {acc.type_name: acc for acc in (
    Accelerator(g, shape) for g in GENERATIONS for shape in g.shapes)}


def accelerator(name: str) -> Accelerator:
  """The slice a gcloud accelerator type ("v5litepod-8") or a topology
  ("tpu:v5e:2x4", "v5e:2x4") names; a LaunchError naming the valid ones for
  anything else."""
  if name in ACCELERATORS:
    return ACCELERATORS[name]
  topology = name.removeprefix("tpu:")
  for acc in ACCELERATORS.values():
    if acc.topology_name == topology:
      return acc
  prefix = re.split(r"[-:]", topology)[0]
  for g in GENERATIONS:
    if prefix in (g.type_prefix, g.topology_prefix):
      raise errors.LaunchError(
          f"unsupported {g.name} slice {name!r}; {g.name} comes as "
          + ", ".join(f"{a.type_name} (tpu:{a.topology_name})"
                      for a in ACCELERATORS.values() if a.generation is g))
  raise errors.LaunchError(
      f"unknown accelerator type {name!r}; expected one of "
      f"{', '.join(ACCELERATORS)}, or a topology such as tpu:v5e:2x4")


def generation_of(device_kind: str) -> Generation | None:
  """The generation whose chips jax reports as `device_kind`, if a TPU."""
  return next((g for g in GENERATIONS if g.device_kind == device_kind), None)


# PCI ids of TPU chips: Google's vendor id, and the device ids jax's
# hardware_utils knows (v4 0x005e, v5p 0x0062, v5e 0x0063, v6e 0x006f, ...).
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063",
                    "0x006f", "0x0076"}


def tpu_attached(pci_root: str = "/sys/bus/pci/devices") -> bool:
  """Whether this host has a TPU chip on its PCI bus (the test jax makes)."""
  for vendor in glob.glob(os.path.join(pci_root, "*", "vendor")):
    device = pathlib.Path(vendor).with_name("device")
    if (pathlib.Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR
        and device.exists()
        and device.read_text().strip() in _TPU_PCI_DEVICES):
      return True
  return False


def prepare_host(cpu_only: bool, attached: bool | None = None) -> dict:
  """Ready a host with no TPU attached for libtpu; call it before jax starts
  a backend. Returns the environment variables it set.

  libtpu, once installed, describes TPU slices to compile for and is also
  tried as a backend by every jax run: on a host without a TPU it would ask
  the GCE metadata server what TPU it has (TPU_SKIP_MDS_QUERY skips that) and
  log errors about the workers and accelerator type it cannot find (naming
  this host alone, of one host, keeps it quiet), and its lock on the TPU
  (/tmp/libtpu_lockfile) would fail every other process on the host that
  loads it, a parallel test worker or compile (with no TPU to guard, several
  may load it). With `cpu_only` (a CPU run,
  or a compile for a target that is not attached) jax also skips the TPU
  backend's failed start. A variable the user set is kept, and a host with a
  TPU attached (`attached`; default: `tpu_attached()`) is left as it is, so a
  real TPU worker is never forced onto the CPU.
  """
  if attached is None:
    attached = tpu_attached()
  if attached:
    return {}
  wanted = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
            "TPU_HOST_BOUNDS": "1,1,1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  if cpu_only:
    wanted["JAX_PLATFORMS"] = "cpu"
  chosen = {k: v for k, v in wanted.items() if k not in os.environ}
  os.environ.update(chosen)
  if "JAX_PLATFORMS" in chosen and "jax" in sys.modules:
    # jax read JAX_PLATFORMS when it was imported; its backends start later.
    sys.modules["jax"].config.update("jax_platforms", "cpu")
  return chosen
