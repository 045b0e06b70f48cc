"""Latency of checkpoints side by side: p50/p90/p99 per batch size, one run,
then MLPerf LoadGen scenarios on the first checkpoint.

  python -m experiments.bench --checkpoints=workdirs/compress/teacher,workdirs/compress/structured \
      --batch_sizes=1,256 --output=workdirs/compress/bench.json
  python -m experiments.bench --checkpoints=workdirs/lenet5,workdirs/default,workdirs/vit \
      --conv_lowering=auto --embed_weights --peers --profile=/tmp/trace \
      --results=experiments/results/bench_peers.md
  python -m experiments.bench --checkpoints=workdirs/default --loadgen=SingleStream,Server,Offline \
      --loadgen_seconds=10 --server_latency_ms=5 --find_peak_qps

A decoder language model is measured generating instead (rtjax.bench.
generation): TTFT per prompt-length bucket, TPOT and tokens/s at 1 and
--slots slots, TPOT as the context fills, greedy tokens against recomputing
the prefix, with --peers a PyTorch twin with its own KV cache in turns, and
with --precisions float32, bf16, int8 weights and an int8 KV cache; with
--drafts, speculative decoding with each draft instead (rtjax.bench.
speculation); with --loadgen, LoadGen with token latencies, continuous
beside static batching, Offline and the Server peak (rtjax.bench.
generation_loadgen):
  python -m experiments.bench --checkpoints=workdirs/lm/target --peers \
      --precisions --results=experiments/results/generate_target.md
  python -m experiments.bench --checkpoints=workdirs/compress_lm/teacher \
      --drafts=workdirs/compress_lm/distilled,workdirs/compress_lm/scratch,\
workdirs/compress_lm/pruned --results=experiments/results/speculative_target.md
  python -m experiments.bench --checkpoints=workdirs/lm/target --loadgen=Server,Offline \
      --results=experiments/results/loadgen_generate_target.md

Each checkpoint is rebuilt from its metadata, BatchNorm folded and
AOT-compiled per batch size (compile time reported apart); calls alternate
between the checkpoints, and speedups are against the first one. With
--peers, every checkpoint is also timed in turns with ONNX Runtime and
PyTorch on its weights (rtjax.bench.peers).
"""

import dataclasses
import json

import jax
from absl import flags
from etils import epath

from experiments import cli
from rtjax.bench import breakdown, loadgen, provenance, report, side_by_side
from rtjax.bench import generation as generation_bench
from rtjax.bench import generation_loadgen
from rtjax.bench import speculation
from rtjax.checkpoint import checkpoint_dataset, load_checkpoint, run_name
from rtjax.infer import CompiledModel, make_mesh, parse_mesh
from rtjax.infer.engine import Engine, is_decoder, vocabulary_of

_CHECKPOINTS = flags.DEFINE_list("checkpoints", None, "Checkpoint paths; the "
                                 "first is the reference.", required=True)
_BATCH_SIZES = cli.define_batch_sizes(["1", "256"])
_ITERS = flags.DEFINE_integer("iters", 300, "Timed calls per model and batch.")
_WARMUP = flags.DEFINE_integer("warmup", 30, "Untimed calls first.")
_OUTPUT = flags.DEFINE_string("output", "", "JSON results file.")
_RESULTS = flags.DEFINE_string("results", "", "Also write the latency (and "
                               "peer) tables, stamped with how they were "
                               "measured, to this markdown file, e.g. "
                               "experiments/results/bench_lenet5.md.")
_LOADGEN = flags.DEFINE_list("loadgen", [], "LoadGen scenarios to run on the "
                             "first checkpoint: SingleStream, Server, Offline.")
_LOADGEN_SECONDS = flags.DEFINE_float("loadgen_seconds", 0, "Minimum duration "
                                      "per scenario; 0 keeps LoadGen's defaults.")
_SERVER_QPS = flags.DEFINE_float("server_qps", 500, "Server target QPS.")
_SERVER_LATENCY = flags.DEFINE_float("server_latency_ms", 10, "Server p99 deadline.")
_PEAK = flags.DEFINE_bool("find_peak_qps", False, "Bisect the highest Server "
                          "QPS that stays VALID.")
_LOADGEN_DIR = flags.DEFINE_string("loadgen_dir", "loadgen_logs", "LoadGen logs.")
_LOADGEN_MAX_BATCH = flags.DEFINE_integer("loadgen_max_batch", 32, "Largest "
                                          "batch the Server/Offline batcher forms.")
_ROUND = flags.DEFINE_integer("round_widths_to", None, "Serve every float "
                              "model with its widths padded by zero units to "
                              "a multiple of this (same outputs). Default: "
                              "the checkpoint's choice for this kind of "
                              "device, else 0 (off).")
_LOADGEN_PATHS = flags.DEFINE_list(
    "loadgen_paths", ["in_process"], "Where LoadGen's queries go, side by "
    "side: in_process (the batcher in this process) and/or network (the "
    "running server at --loadgen_url; Offline runs in process only).")
_LOADGEN_URL = flags.DEFINE_string("loadgen_url", "", "A running `python -m "
                                   "experiments.serve` serving the first "
                                   "checkpoint, e.g. http://127.0.0.1:8000.")
_LOADGEN_MODEL = flags.DEFINE_string("loadgen_model", "", "The model's name "
                                     "on that server; default: the first "
                                     "checkpoint's run directory name.")
_LOADGEN_REPEATS = flags.DEFINE_integer("loadgen_repeats", 1, "Repetitions of "
                                        "every LoadGen run; the table gives "
                                        "medians.", lower_bound=1)
_LOW_LOAD = flags.DEFINE_float("server_low_load", 0.1, "With --find_peak_qps,"
                               " also run Server at this fraction of the "
                               "peak.", lower_bound=0.0, upper_bound=1.0)
flags.register_validator(
    "loadgen_paths", lambda paths: set(paths) <= {"in_process", "network"},
    "--loadgen_paths: give in_process and/or network")
flags.register_multi_flags_validator(
    ["loadgen_paths", "loadgen_url"],
    lambda v: "network" not in v["loadgen_paths"] or bool(v["loadgen_url"]),
    "--loadgen_paths=network needs --loadgen_url, the address of a running "
    "python -m experiments.serve")
_PEERS = flags.DEFINE_bool("peers", False, "Time peers on each checkpoint's "
                           "weights, in turns with rtjax: ONNX Runtime "
                           "(rtjax[onnx]) on the model's natural export, "
                           "PyTorch eager and torch.compile (image families, "
                           "if torch is installed).")
_PEERS_RTJAX_GRAPH = flags.DEFINE_bool(
    "peers_rtjax_graph", False, "With --peers, also ONNX Runtime on the "
    "export of rtjax's own serving graph (a secondary row).")
_TORCH_COMPILE = flags.DEFINE_bool("torch_compile", True, "With --peers, "
                                   "also time torch.compile (compiles once "
                                   "per model and batch size).")
_PROFILE = flags.DEFINE_string("profile", "", "Write a jax.profiler trace "
                               "of the timed serving calls to this directory "
                               "(Perfetto: the perfetto_trace.json.gz under "
                               "plugins/profile/; or TensorBoard's profile "
                               "plugin).")
_STREAM = flags.DEFINE_list("stream_chunks", [], "Also stream the first "
                            "checkpoint (a unidirectional gru/lstm with "
                            "head='last', or a causal transformer1d) in "
                            "chunks of these many steps: "
                            "per-step p50/p99 and host overhead per step.")
_PUBLISHED = flags.DEFINE_list("published_peaks", [], "Also predict with these "
                               f"chips' published peaks: {', '.join(breakdown.PUBLISHED_PEAKS)}.")

_SLOTS = flags.DEFINE_integer("slots", 8, "Language models: requests the "
                              "engine decodes side by side.", lower_bound=1)
_GEN_TOKENS = flags.DEFINE_integer("gen_tokens", 128, "Language models: "
                                   "tokens each request generates.",
                                   lower_bound=2)
_PROMPTS = flags.DEFINE_integer("prompts", 20, "Language models: prompts "
                                "(windows of the test text) per measurement.",
                                lower_bound=1)
_GEN_ROUNDS = flags.DEFINE_integer("gen_rounds", 5, "Language models: turns "
                                   "of the engine and its twin.",
                                   lower_bound=1)
_PRECISIONS = flags.DEFINE_bool("precisions", False, "Language models: "
                                "also float32, bfloat16, int8 weights (qwix "
                                "w8), an int8 KV cache and both side by side: "
                                "loss through the cache, cache bytes, TPOT.")
_DRAFTS = flags.DEFINE_list("drafts", [], "Language models: draft decoders' "
                            "checkpoints; measures speculative decoding with "
                            "each at batch 1 (acceptance, speedup) instead.")
_KS = flags.DEFINE_list("speculate_ks", ["1", "2", "3", "4", "6"], "Language "
                        "models with --drafts: the tokens a draft proposes a "
                        "round, each measured.")
_MESH = flags.DEFINE_string("mesh", "", "Language models: the engine's mesh, "
                            "e.g. model:2 (simulated CPU devices: XLA_FLAGS="
                            "--xla_force_host_platform_device_count=2); "
                            "default: one device.")

_SERVING = cli.ServingFlags()

def main(argv):
  del argv
  serving = _SERVING.setup()
  model, metadata = load_checkpoint(_CHECKPOINTS.value[0])
  if is_decoder(model):
    return bench_generation(model, metadata, serving)
  batches = cli.batch_sizes(_BATCH_SIZES)
  stream_chunks = (cli.positive_ints("stream_chunks", _STREAM.value)
                   if _STREAM.value else [])
  side_by_side.check_names(_LOADGEN.value, _PUBLISHED.value)
  paths = _CHECKPOINTS.value
  served = [CompiledModel.from_checkpoint(path, batch_sizes=batches,
                                          round_widths_to=_ROUND.value,
                                          **serving)
            for path in paths]
  rows = side_by_side.latency_rows(paths, served, batches, _ITERS.value,
                                   _WARMUP.value, _PROFILE.value)
  peaks = side_by_side.add_breakdowns(rows, dict(zip(paths, served)),
                                      _PUBLISHED.value)
  overhead = side_by_side.call_paths(served[0])
  peer_results = (side_by_side.peer_rows(
      paths, served, batches, _ITERS.value, _WARMUP.value,
      _PEERS_RTJAX_GRAPH.value, _TORCH_COMPILE.value) if _PEERS.value else {})
  streaming = side_by_side.streaming_rows(paths[0], stream_chunks,
                                          _ITERS.value, _WARMUP.value)
  scenarios = run_loadgen(paths[0], serving) if _LOADGEN.value else {}
  if _RESULTS.value:
    provenance.write_results(_RESULTS.value, "\n".join(filter(None, (
        report.latency_markdown(rows), report.peers_markdown(peer_results),
        report.streaming_markdown(streaming), scenarios.get("markdown")))))
  if _OUTPUT.value:
    epath.Path(_OUTPUT.value).write_text(json.dumps(
        {"lowering": {p: side_by_side.lowering_report(m)
                      for p, m in zip(paths, served)},
         "latency": rows, "peaks": peaks, "host_overhead": overhead,
         "peers": peer_results, "streaming": streaming,
         "loadgen": scenarios},
        indent=1))


def bench_generation(model, metadata, serving: dict) -> None:
  """The first checkpoint's decoder generating; the tables to --results."""
  mesh = (make_mesh(parse_mesh(_MESH.value)) if _MESH.value
          else make_mesh({"data": 1}, jax.devices()[:1]))
  context = metadata["model"]["args"]["input_shape"][0]
  options = {"dtype": serving["dtype"], "dot_kernels": serving["dot_kernels"],
             "mesh": mesh}
  stream = checkpoint_dataset(metadata).test.images.reshape(-1)
  texts = generation_bench.prompts(stream, _PROMPTS.value, 16,
                                   vocabulary_of(metadata))
  if _DRAFTS.value:
    rows = speculation.measure(
        model, context, metadata, _DRAFTS.value,
        cli.positive_ints("speculate_ks", _KS.value), texts,
        _GEN_TOKENS.value, _GEN_ROUNDS.value, options)
    table = speculation.markdown(rows, metadata, len(texts),
                                 _GEN_TOKENS.value, _GEN_ROUNDS.value)
  elif _LOADGEN.value:
    results = generation_loadgen.measure(
        Engine(model, context, metadata, slots=_SLOTS.value, **options),
        generation_bench.prompts(stream, _PROMPTS.value, context - 1,
                                 vocabulary_of(metadata)),
        _LOADGEN_DIR.value, _LOADGEN_SECONDS.value or 10.0,
        low_load=_LOW_LOAD.value)
    table = generation_loadgen.markdown(results)
  else:
    table = generation_bench.tables(
        model, context, metadata, options, stream, texts, _SLOTS.value,
        _GEN_TOKENS.value, _GEN_ROUNDS.value, _PEERS.value, _PRECISIONS.value)
  print(table)
  if _RESULTS.value:
    provenance.write_results(_RESULTS.value, table)


def run_loadgen(path: str, serving: dict) -> dict:
  """The scenarios on the checkpoint's own test images (the QSL), served
  with power-of-two buckets (so the batcher pads little) in process and/or
  through the running server, each --loadgen_repeats times; medians side by
  side in a markdown table."""
  max_batch = _LOADGEN_MAX_BATCH.value
  buckets = [2 ** i for i in range(max_batch.bit_length()) if 2 ** i <= max_batch]
  model = CompiledModel.from_checkpoint(path, batch_sizes=buckets,
                                        round_widths_to=_ROUND.value,
                                        **serving)
  samples = checkpoint_dataset(model.metadata).test.images
  settings = loadgen.LoadGenConfig(
      min_duration_ms=int(_LOADGEN_SECONDS.value * 1000),
      min_query_count=1000 if _LOADGEN_SECONDS.value else 0,
      target_qps=_SERVER_QPS.value, target_latency_ms=_SERVER_LATENCY.value,
      max_batch=max_batch)
  results, summaries = {}, {}
  for where in _LOADGEN_PATHS.value:
    network = where == "network"
    config = dataclasses.replace(
        settings, server_url=_LOADGEN_URL.value if network else "",
        model_name=(_LOADGEN_MODEL.value or run_name(path))
        if network else "")
    scenarios = [s for s in _LOADGEN.value if not (network and s == "Offline")]
    runs = []
    for k in range(_LOADGEN_REPEATS.value):
      # Over the network the peak is bisected below the in-process one.
      high = (results.get("in_process", [{}] * (k + 1))[k].get(
          "server_peak", {}).get("peak_valid_qps") if network else None)
      runs.append(loadgen.profile(
          model, samples, config, epath.Path(_LOADGEN_DIR.value) / where /
          f"run{k}", scenarios, _PEAK.value, _LOW_LOAD.value, high=high))
      print(f"LoadGen {where} run {k}: {json.dumps(runs[-1])}", flush=True)
    results[where] = runs
    summaries[where] = loadgen.summarize(runs)
  results["summary"] = summaries
  results["markdown"] = loadgen.markdown(summaries, _SERVER_LATENCY.value,
                                         _LOW_LOAD.value)
  print(results["markdown"], flush=True)
  return results


if __name__ == "__main__":
  cli.run(main)
