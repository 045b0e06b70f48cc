"""What every entry point shares: the run wrapper that turns user errors into
one line and exit code 2, the flags several commands take, and log filtering.

  cli.run(main)                 instead of app.run(main)
  cli.config(flag)              a --config flag's value; load errors are user errors
  cli.batch_sizes(flag)         positive ints from a --batch_sizes list
  cli.ServingFlags()            the serving options bench, predict, compare share
  cli.DataclassFlags(cls)       a flag per field of a dataclass (one declaration)
"""

from __future__ import annotations

import dataclasses
import logging as std_logging
import sys
import typing
from typing import Callable

import jax
from absl import app, flags, logging

from rtjax import distributed
from rtjax.checkpoint.store import out_of_space
from rtjax.errors import ConfigError, FlagError, RunError, UserError  # noqa: F401 (re-exported)


def fail(message: str, code: int = 2) -> None:
  """`error: <message>` on one line of stderr, then exit (2: user error)."""
  sys.stderr.write("error: " + " ".join(str(message).split()) + "\n")
  sys.stderr.flush()
  sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except KeyError as e:  # ml_collections: a --config.* override of no key
    fail(f"unknown config key {e.args[0]} in a --config.* override; the "
         "keys are those of rtjax.config.base_config()")
  except OSError as e:  # ml_collections: overrides of a file that did not load
    fail(f"the config file cannot be loaded ({e.__cause__ or e}); give an "
         "existing file such as configs/default.py, optionally with :variant")
  except flags.Error as e:
    message = str(e)
    if "Error whilst parsing config file" in message:
      # ml_collections re-raises get_config()'s ValueError/TypeError with its
      # whole traceback in the message: keep the flag and the last line.
      flag = message.split(": Error whilst parsing config file", 1)[0]
      message = f"{flag}: {message.strip().splitlines()[-1]}"
    fail(f"{message}; run with --helpfull to list the flags")


def run(main: Callable[[list[str]], None]) -> None:
  """app.run(main) where a UserError ends as one line and exit code 2, a
  RunError (a failed run) or a full disk as one line and exit code 1;
  anything else keeps its traceback."""
  def guarded(argv):
    try:
      return main(argv)
    except UserError as e:
      fail(str(e))
    except RunError as e:
      fail(str(e), code=1)
    except OSError as e:
      if not out_of_space(e):
        raise
      fail(f"no space left on device{_written_file(e)}; free some space and "
           "rerun the same command (training resumes from its newest intact "
           "checkpoint)", code=1)
  app.run(guarded, flags_parser=_parse_flags)


def _written_file(error: BaseException | None) -> str:
  """` writing <file>` for the first file named in an error's chain; a
  failed write() names none."""
  while error is not None:
    if getattr(error, "filename", None):
      return f" writing {error.filename}"
    error = error.__cause__ or error.__context__
  return ""


def config(flag):
  """The value of a config_flags flag. ml_collections loads the file and
  applies --config.* overrides lazily, raising plain Python errors; here they
  become ConfigErrors that name the file or key."""
  try:
    value = flag.value
    value.keys()  # a file that failed to load is an _ErrorConfig: OSError here
    return value
  except KeyError as e:  # a misspelled key in an override
    raise ConfigError(f"--{flag.name}: unknown key {e.args[0]}. The keys are "
                      "those of rtjax.config.base_config()") from None
  except (OSError, ImportError, SyntaxError) as e:
    e = e.__cause__ or e  # _ErrorConfig's OSError wraps the loading error
    raise ConfigError(f"--{flag.name}: the config file cannot be loaded "
                      f"({e}); give an existing file such as "
                      "configs/default.py, optionally with :variant") from None
  except (ValueError, TypeError, AttributeError) as e:
    raise ConfigError(f"--{flag.name}: {e}") from None


def positive_ints(name: str, values: list[str]) -> list[int]:
  """A --name=a,b,c list of positive integers, or a FlagError naming it."""
  try:
    numbers = [int(v) for v in values]
  except ValueError:
    numbers = []
  if not numbers or any(n < 1 for n in numbers):
    raise FlagError(f"--{name}={','.join(values)}: give positive integers "
                    f"separated by commas, e.g. --{name}=1,256")
  return numbers


# ---- flags several commands take ------------------------------------------

def define_checkpoint(help: str = "Workdir, its checkpoints/ or one step "
                      "directory.", required: bool = True):
  return flags.DEFINE_string("checkpoint", None, help, required=required)


def define_batch_sizes(default: list[str], help: str = "Batch sizes."):
  return flags.DEFINE_list("batch_sizes", default, help)


def batch_sizes(flag) -> list[int]:
  """A batch-size list flag's values, validated."""
  return positive_ints(flag.name, flag.value)


class DataclassFlags:
  """One flag per field of a dataclass, named as the field, with its
  default and the help in its metadata ('help'): bool, int, float, str, and
  tuples of numbers or strings as comma-separated lists. value() builds the
  dataclass back from the parsed flags, checked by its problems() when it
  has one; a bad value is a FlagError naming the flag."""

  def __init__(self, cls: type, flag_values: flags.FlagValues = flags.FLAGS):
    self._cls, self._types = cls, typing.get_type_hints(cls)
    self._holders = {}
    for field in dataclasses.fields(cls):
      if field.default is dataclasses.MISSING:
        raise TypeError(f"{cls.__name__}.{field.name} has no default")
      self._holders[field.name] = _define(
          field.name, self._types[field.name], field.default,
          field.metadata.get("help", ""), flag_values)

  def value(self):
    out = self._cls(**{name: _parsed(name, self._types[name], holder.value)
                       for name, holder in self._holders.items()})
    for name, problem in getattr(out, "problems", list)()[:1]:
      raise FlagError(f"--{name}: {problem}")
    return out


def _define(name: str, kind, default, help: str, flag_values):
  if typing.get_origin(kind) is tuple:
    shown = [f"{v:g}" if isinstance(v, float) else str(v) for v in default]
    return flags.DEFINE_list(name, shown, help, flag_values=flag_values)
  define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
            float: flags.DEFINE_float, str: flags.DEFINE_string}[kind]
  return define(name, default, help, flag_values=flag_values)


def _parsed(name: str, kind, value):
  """A list flag's strings as the field's tuple; other values as parsed."""
  if typing.get_origin(kind) is not tuple:
    return value
  element = typing.get_args(kind)[0]
  try:
    return tuple(element(v) for v in value)
  except ValueError:
    raise FlagError(f"--{name}={','.join(value)}: give {element.__name__} "
                    "values separated by commas") from None


class MultihostFlags:
  """How a command joins a multi-process run: --multihost on Cloud TPU (jax
  finds the hosts), or --coordinator_address/--num_processes/--process_id."""

  def __init__(self):
    self.multihost = flags.DEFINE_bool(
        "multihost", False, "Cloud TPU VM / pod slice: "
        "jax.distributed.initialize() detects the hosts (experiments.launch "
        "sets this).")
    self.coordinator = flags.DEFINE_string(
        "coordinator_address", None, "host:port of process 0, for "
        "multi-process runs outside Cloud TPU (with --num_processes and "
        "--process_id).")
    self.num_processes = flags.DEFINE_integer("num_processes", None,
                                              "Processes in the run.")
    self.process_id = flags.DEFINE_integer("process_id", None,
                                           "This process's index.")

  def initialize(self) -> None:
    """Before anything touches a device."""
    if self.multihost.value or self.coordinator.value:
      distributed.initialize(self.coordinator.value, self.num_processes.value,
                             self.process_id.value)


class ServingFlags:
  """The serving options bench, predict and compare share; define once per
  entry point at module level, call setup() first in main(). An option not
  given follows rtjax.infer.options: what the checkpoint recorded for this
  kind of device, else that kind's default."""

  def __init__(self):
    self.conv_lowering = flags.DEFINE_string(
        "conv_lowering", None, "xla: XLA's convolutions; auto: time XLA's "
        "conv and banded matmuls per conv layer and batch size, keep the "
        "fastest; or pin a choice of output block rows x cols, e.g. "
        "conv1:4x4,conv2:1x5. Default: the checkpoint's choice for this kind "
        "of device, else xla.")
    self.embed_weights = flags.DEFINE_bool(
        "embed_weights", None, "Compile the weights into the executables as "
        "constants (small models; no model mesh axis). Default: the "
        "checkpoint's choice for this kind of device, else off.")
    self.dtype = flags.DEFINE_enum(
        "dtype", None, ["float32", "bfloat16"], "Serving precision: bfloat16 "
        "holds weights and activations in bf16 and accumulates in f32. "
        "Default: the checkpoint's choice for this kind of device, else "
        "float32.")
    self.dot_kernels = flags.DEFINE_enum(
        "dot_kernels", None, ["ynnpack", "xla"], "What runs the matmuls on a "
        "CPU: ynnpack (jax's default there) or XLA's own kernels. Default: "
        "the checkpoint's choice for this kind of device, else ynnpack on "
        "CPU, xla elsewhere.")
    self.async_dispatch = flags.DEFINE_bool(
        "cpu_async_dispatch", False, "Keep jax's asynchronous CPU dispatch. "
        "Off by default here: handing each call to a worker thread costs "
        "more than a small batch-1 call takes.")

  def setup(self) -> dict:
    """Before any JAX computation creates the CPU client (the dispatch mode
    is fixed then); also quiets orbax's INFO logs. Returns CompiledModel's
    serving options (None: not given)."""
    from rtjax.infer.lowering import parse_lowering  # jax/flax: serving only
    quiet_orbax()
    jax.config.update("jax_cpu_enable_async_dispatch",
                      self.async_dispatch.value)
    lowering = self.conv_lowering.value
    if lowering is not None:
      try:
        lowering = parse_lowering(lowering)
      except ValueError as e:
        raise FlagError(f"--conv_lowering: {e}") from None
    return {"conv_lowering": lowering, "embed_weights": self.embed_weights.value,
            "dtype": self.dtype.value, "dot_kernels": self.dot_kernels.value}


# ---- logs -----------------------------------------------------------------

def _not_orbax_info(record) -> bool:
  # record.levelno is a Python level: absl's logging.WARNING is 1, not 30.
  return "orbax" not in record.pathname or record.levelno >= std_logging.WARNING


def quiet_orbax() -> None:
  """Orbax logs every file operation at INFO; keep its warnings and errors.
  Call in main(), once absl has installed its handler."""
  logging.get_absl_handler().addFilter(_not_orbax_info)
