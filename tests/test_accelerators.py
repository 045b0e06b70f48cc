"""Cloud TPU facts: the table's consistency and sources, the slices it
names against counts from the Cloud TPU pages, the launch plan's reading of
it, refusals that name the valid types, and readying a host without a TPU.
Where libtpu is installed (the [tpu] extra), the TPU compiler checks the
table: every topology, the tiles of compiled layouts, each chip's HBM."""

import math
import os
import re
import subprocess
import sys

import pytest

from rtjax import accelerators, errors, tpu
from rtjax.accelerators import ACCELERATORS, GENERATIONS, accelerator

# (chips, hosts) of slices as the Cloud TPU pages and gcloud count them: v4
# and v5p names count TensorCores (2 per chip); one v5e or v6e host holds up
# to 8 chips, larger slices and every v4/v5p slice are made of 4-chip hosts.
COUNTED = {"v4-8": (4, 1), "v4-32": (16, 4), "v5litepod-1": (1, 1),
           "v5litepod-4": (4, 1), "v5litepod-8": (8, 1),
           "v5litepod-16": (16, 4), "v5litepod-256": (256, 64),
           "v5p-8": (4, 1), "v5p-16": (8, 2), "v5p-4096": (2048, 512),
           "v6e-8": (8, 1), "v6e-256": (256, 64)}


def test_slices_match_the_counts_of_the_cloud_tpu_pages():
  for name, (chips, hosts) in COUNTED.items():
    acc = accelerator(name)
    assert (acc.chips, acc.hosts) == (chips, hosts), name
  assert accelerator("v5litepod-8").topology_name == "v5e:2x4"
  assert accelerator("v4-8").topology_name == "v4:2x2x1"
  assert accelerator("v5litepod-1").chips_per_host_bounds == (1, 1, 1)


def test_table_is_consistent_and_names_round_trip():
  assert len(ACCELERATORS) == sum(len(g.shapes) for g in GENERATIONS)
  for name, acc in ACCELERATORS.items():
    assert acc.chips == acc.hosts * acc.chips_per_host, name
    assert math.prod(acc.chips_per_host_bounds) == acc.chips_per_host, name
    assert acc.hosts == 1 or (
        acc.chips_per_host == accelerators.MULTI_HOST_CHIPS_PER_HOST), name
    prefix, size = name.rsplit("-", 1)
    assert prefix == acc.generation.type_prefix
    per_chip = acc.generation.cores_per_chip if acc.generation.type_counts_cores else 1
    assert int(size) == acc.chips * per_chip, name
    assert accelerator(name) is acc
    assert accelerator(f"tpu:{acc.topology_name}") is acc
    args = acc.topology_desc_args
    assert args["topology_name"] == acc.topology_name and args["platform"] == "tpu"
  kinds = [g.device_kind for g in GENERATIONS]
  assert len(set(kinds)) == len(kinds)
  assert all(accelerators.generation_of(g.device_kind) is g for g in GENERATIONS)
  assert accelerators.generation_of("cpu") is None


def test_every_figure_has_its_page_or_says_why_it_has_none():
  for g in GENERATIONS:
    assert g.source == f"https://cloud.google.com/tpu/docs/{g.name}", g.name
    assert set(g.unpublished) <= set(accelerators.FIGURES), g.name
    for figure in accelerators.FIGURES:
      value = getattr(g, figure)
      assert (value is None) == (figure in g.unpublished), (g.name, figure)
      assert value is None or value > 0
      assert value is not None or g.unpublished[figure].strip()


def test_published_rates_as_the_pages_relate_them():
  by_name = {g.name: g for g in GENERATIONS}
  # v5e and v6e publish int8 at twice bf16; v4 one figure for both; v5p no int8.
  for name in ("v5e", "v6e"):
    g = by_name[name]
    assert g.int8_ops_per_s / g.bf16_flops_per_s == pytest.approx(2, rel=0.01)
  assert by_name["v4"].int8_ops_per_s == by_name["v4"].bf16_flops_per_s
  assert by_name["v5p"].int8_ops_per_s is None
  assert {g.name: g.mxu for g in GENERATIONS} == {
      "v4": (128, 128), "v5e": (128, 128), "v5p": (128, 128), "v6e": (256, 256)}
  assert accelerators.TILES == {"float32": (8, 128), "bfloat16": (16, 128),
                                "int8": (32, 128)}


def test_unknown_and_unsupported_types_name_the_valid_ones():
  with pytest.raises(errors.LaunchError) as unknown:
    accelerator("v9-8")
  message = str(unknown.value)
  assert "unknown accelerator type 'v9-8'" in message
  assert all(re.search(rf"\b{re.escape(n)}\b", message) for n in ACCELERATORS)
  with pytest.raises(errors.LaunchError) as unsupported:
    accelerator("v5litepod-12")
  message = str(unsupported.value)
  assert "'v5litepod-12'" in message and "v5litepod-8 (tpu:v5e:2x4)" in message
  assert "v4-8" not in message and "v6e" not in message
  with pytest.raises(errors.LaunchError, match="v5litepod-16"):
    accelerator("tpu:v5e:3x3")


def test_launch_plan_reads_workers_and_runtimes_from_the_table():
  for name, acc in ACCELERATORS.items():
    assert tpu.num_workers(name) == acc.hosts
    spec = tpu.TpuSpec("rt", "z", "p", name)
    assert spec.runtime == acc.generation.runtime_version
  assert tpu.RUNTIME_VERSIONS == {g.type_prefix: g.runtime_version
                                  for g in GENERATIONS}
  # gcloud takes types, not topologies: the message names the type to use.
  with pytest.raises(errors.LaunchError, match="v5litepod-16 for tpu:v5e:4x4"):
    tpu.num_workers("tpu:v5e:4x4")


def test_breakdown_peaks_are_the_tables():
  from rtjax.bench import breakdown
  for g in GENERATIONS:
    peaks = breakdown.PUBLISHED_PEAKS[f"tpu_{g.name}"]
    assert peaks == {"flops_per_s": g.bf16_flops_per_s,
                     "bytes_per_s": g.hbm_bytes_per_s,
                     "comm_bytes_per_s": g.ici_bytes_per_s, "source": g.source}


def _pci_device(root, name, vendor, device):
  path = root / name
  path.mkdir(parents=True)
  (path / "vendor").write_text(vendor + "\n")
  (path / "device").write_text(device + "\n")


def test_tpu_attached_reads_tpu_chips_on_the_pci_bus(tmp_path):
  _pci_device(tmp_path, "0000:00:04.0", "0x1ae0", "0x0042")  # Google's gVNIC
  _pci_device(tmp_path, "0000:00:05.0", "0x10de", "0x2330")  # an NVIDIA GPU
  assert not accelerators.tpu_attached(str(tmp_path))
  _pci_device(tmp_path, "0000:00:06.0", "0x1ae0", "0x0063")  # a v5e chip
  assert accelerators.tpu_attached(str(tmp_path))


QUIET = ("TPU_SKIP_MDS_QUERY", "TPU_WORKER_HOSTNAMES", "TPU_HOST_BOUNDS",
         "ALLOW_MULTIPLE_LIBTPU_LOAD")


def test_prepare_host_leaves_a_tpu_worker_and_the_users_choices(monkeypatch):
  for name in (*QUIET, "JAX_PLATFORMS"):
    monkeypatch.delenv(name, raising=False)
  assert accelerators.prepare_host(cpu_only=True, attached=True) == {}
  assert not any(name in os.environ for name in (*QUIET, "JAX_PLATFORMS"))
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
  chosen = accelerators.prepare_host(cpu_only=False, attached=False)
  assert set(chosen) == {"TPU_SKIP_MDS_QUERY", "TPU_HOST_BOUNDS",
                         "ALLOW_MULTIPLE_LIBTPU_LOAD"}
  assert os.environ["TPU_WORKER_HOSTNAMES"] == "w0,w1"
  assert os.environ["TPU_SKIP_MDS_QUERY"] == "1"
  assert "JAX_PLATFORMS" not in os.environ  # a GPU host keeps its GPU


def test_prepare_host_keeps_jax_off_the_tpu_for_a_cpu_run():
  # jax reads JAX_PLATFORMS when imported: prepare_host, called after the
  # import and before a backend starts, still reaches it.
  code = ("import jax\nfrom rtjax import accelerators\n"
          "print(accelerators.prepare_host(cpu_only=True, attached=False))\n"
          "print(jax.config.jax_platforms, jax.default_backend())")
  env = {k: v for k, v in os.environ.items() if k not in (*QUIET, "JAX_PLATFORMS")}
  result = subprocess.run([sys.executable, "-c", code], env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  chosen, platforms = result.stdout.splitlines()
  assert "'JAX_PLATFORMS': 'cpu'" in chosen
  assert platforms == "cpu cpu"


# --- with libtpu installed: the TPU compiler checks the table ---------------


@pytest.fixture(scope="module")
def topologies():
  pytest.importorskip("libtpu", reason="needs the rtjax[tpu] extra")
  accelerators.prepare_host(cpu_only=True)
  from jax.experimental import topologies
  return topologies


def test_libtpu_accepts_every_topology_of_the_table(topologies):
  for name, acc in ACCELERATORS.items():
    devices = topologies.get_topology_desc(**acc.topology_desc_args).devices
    assert len(devices) == acc.chips, name
    assert {d.device_kind for d in devices} == {acc.generation.device_kind}
    assert len({d.process_index for d in devices}) == acc.hosts, name
    assert devices[0].num_cores == acc.generation.cores_per_chip, name


def _one_chip(topologies, generation):
  import jax
  import numpy as np
  acc = ACCELERATORS[f"{generation.type_prefix}-{generation.size(generation.shapes[0])}"]
  devices = topologies.get_topology_desc(**acc.topology_desc_args).devices
  mesh = jax.sharding.Mesh(np.array(devices[:1]), ("chip",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def test_compiled_layouts_have_the_tables_tiles(topologies):
  import jax
  import jax.numpy as jnp
  for generation in GENERATIONS:
    sharding = _one_chip(topologies, generation)
    for dtype, (sublanes, lanes) in accelerators.TILES.items():
      x = jax.ShapeDtypeStruct((300, 300), jnp.dtype(dtype), sharding=sharding)
      text = jax.jit(lambda a: a * 2).lower(x).compile().as_text()
      # e.g. bf16[300,300]{1,0:T(8,128)(2,1)}: 8 sublanes of 32-bit words,
      # each holding 2 rows of bf16.
      tile = re.search(r"\[300,300\]\{1,0:T\((\d+),(\d+)\)(?:\((\d+),1\))?",
                       text)
      assert tile, (generation.name, dtype)
      rows = int(tile.group(1)) * int(tile.group(3) or 1)
      assert (rows, int(tile.group(2))) == (sublanes, lanes), (generation.name, dtype)


def test_compilers_hbm_is_the_published_capacity(topologies):
  import jax
  import jax.numpy as jnp
  for generation in GENERATIONS:
    sharding = _one_chip(topologies, generation)
    too_big = jax.ShapeDtypeStruct((2 * generation.hbm_bytes // 4,),
                                   jnp.float32, sharding=sharding)
    with pytest.raises(Exception, match="exceeds available HBM") as error:
      jax.jit(lambda a: a + 1).lower(too_big).compile()
    available = re.search(r"exceeds available HBM \(([\d.]+)G\)", str(error.value))
    # What the compiler offers (less what the runtime keeps) against the page.
    assert float(available.group(1)) * 2 ** 30 == pytest.approx(
        generation.hbm_bytes, rel=0.05), generation.name


def test_a_cpu_run_with_libtpu_is_quiet_only_from_an_entry_point(topologies):
  code = ("{prepare}import jax, jax.numpy as jnp\n"
          "from jax.experimental import topologies\n"
          "print(float(jnp.ones(4).sum()), jax.default_backend())\n"
          "print(len(topologies.get_topology_desc(platform='tpu', "
          "topology_name='v5e:2x2').devices))")
  prepare = "import experiments\n"  # what every entry point imports first
  env = {k: v for k, v in os.environ.items() if k not in (*QUIET, "JAX_PLATFORMS")}
  # Beside this process, which holds libtpu too, each needs its lock lifted.
  env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
  runs = {}
  for label, head in (("plain", ""), ("prepared", prepare)):
    result = subprocess.run([sys.executable, "-c", code.format(prepare=head)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["4.0", "cpu", "4"], label
    runs[label] = result.stderr
  assert "TPU_WORKER_HOSTNAMES" in runs["plain"]  # what it silences
  assert runs["prepared"] == "", runs["prepared"]
