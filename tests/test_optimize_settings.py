"""One config surface: every optimize setting set through its flag and
through the `optimize` stage's config key gives the same Settings, and no
command's flag restates a dataclass's default as a literal."""

import ast
import dataclasses
import importlib
import importlib.util
import os

import pytest
from absl import flags

from experiments import cli
from rtjax.errors import ConfigError
from rtjax.optimize import stage
from rtjax.optimize.settings import Settings
from rtjax.pipeline import stage_config, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _changed(value):
  """A valid value other than the default, of the same type."""
  if isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return type(value)(value + 2)
  if isinstance(value, str):
    return value + "x"
  return value[:1]  # a tuple: its first element alone


def _flag_text(value) -> str:
  if isinstance(value, tuple):
    return ",".join(map(str, value))
  return str(value)


CHANGED = {f.name: _changed(f.default) for f in dataclasses.fields(Settings)}
CHANGED.update(latency_budget_ms=0.0, budget_of_parent=0.5, percentile=90.0,
               rung_steps=(100, 300), rivals=("workdirs/a", "workdirs/b"),
               sensitivity_groups="conv.*", keep_fractions=(0.5,),
               scratch_min_fraction=0.5)


def _from_flags(args: list[str]) -> Settings:
  values = flags.FlagValues()
  parsed = cli.DataclassFlags(Settings, flag_values=values)
  values(["optimize", *args])
  return parsed.value()


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Settings)])
def test_each_setting_through_a_flag_and_a_config_gives_the_same(name):
  value = CHANGED[name]
  args = ["--budget_of_parent=0.5"] if name != "budget_of_parent" else []
  if name == "latency_budget_ms":  # one of the two budgets, not both
    value, args = 3.0, ["--budget_of_parent=0"]
  if isinstance(value, bool):
    args.append(f"--{'' if value else 'no'}{name}")
  else:
    args.append(f"--{name}={_flag_text(value)}")
  from_flags = _from_flags(args)
  section = stage_config("optimize", **{
      **({"budget_of_parent": 0.5} if name != "latency_budget_ms" else {}),
      name: value})
  from_config = stage.settings_of(section)
  assert getattr(from_flags, name) == value != getattr(Settings(), name)
  assert from_flags == from_config


def test_every_field_has_help_and_bad_values_name_their_flag():
  assert all(f.metadata["help"] for f in dataclasses.fields(Settings))
  with pytest.raises(cli.FlagError, match="--uniform: invalid value"):
    _from_flags(["--budget_of_parent=0.5", "--uniform=0.5,2"])
  with pytest.raises(cli.FlagError, match="--rung_steps=a,1: give int"):
    _from_flags(["--budget_of_parent=0.5", "--rung_steps=a,1"])
  with pytest.raises(cli.FlagError, match="--latency_budget_ms: give exactly"):
    _from_flags([])


def test_a_config_is_checked_by_the_same_rules():
  import rtjax.optimize  # noqa: F401  (registers the stage type)
  from configs import default
  config = default.get_config("tiny")
  config.stages = ("teacher", "optimize")
  config.stage.teacher = stage_config("train")
  config.stage.optimize = stage_config("optimize", budget_of_parent=0.5,
                                       halving_eta=1)
  with pytest.raises(ConfigError, match="halving_eta: invalid value 1"):
    validate(config)


# ---- no flag restates a dataclass's default ---------------------------------

def _literal(node):
  try:
    return ast.literal_eval(node)
  except ValueError:
    return _NOT_LITERAL


_NOT_LITERAL = object()


def _normal(value):
  """Lists as tuples, numbers in strings as numbers: how a list flag's
  default of strings restates a tuple of numbers."""
  if isinstance(value, (list, tuple)):
    return tuple(_normal(v) for v in value)
  if isinstance(value, str):
    try:
      return float(value)
    except ValueError:
      return value
  return value


def _dataclass_defaults(module_names: list[str]) -> dict[str, list]:
  """{field name: [default, ...]} of the dataclasses the modules hold or
  import (a field without a plain default is left out)."""
  out = {}
  for name in module_names:
    module = importlib.import_module(name)
    for obj in vars(module).values():
      if isinstance(obj, type) and dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
          if f.default is not dataclasses.MISSING:
            out.setdefault(f.name, []).append(f.default)
  return out


def restated_defaults(path: str) -> list[str]:
  """`DEFINE_*(name, default, ...)` calls whose default is a literal equal
  (lists as tuples, numeric strings as numbers) to the default of a field
  of that name in a dataclass the file imports from rtjax (the module
  itself or a name taken from it). Such a flag is a second home of the
  default: change the dataclass and the flag silently disagrees."""
  tree = ast.parse(open(path).read())
  modules = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
        "rtjax"):
      modules.append(node.module)
      modules += [f"{node.module}.{a.name}" for a in node.names
                  if _is_module(f"{node.module}.{a.name}")]
    elif isinstance(node, ast.Import):
      modules += [a.name for a in node.names if a.name.startswith("rtjax")]
  defaults = _dataclass_defaults(modules)
  found = []
  for node in ast.walk(tree):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr.startswith("DEFINE_") and len(node.args) >= 2
        and isinstance(node.args[0], ast.Constant)):
      name, literal = node.args[0].value, _literal(node.args[1])
      if literal is not _NOT_LITERAL and any(
          _normal(literal) == _normal(d) for d in defaults.get(name, [])):
        found.append(f"{os.path.basename(path)}:{node.lineno} --{name}")
  return found


def _is_module(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except ModuleNotFoundError:
    return False


def test_no_flag_restates_a_dataclass_default():
  directory = os.path.join(REPO, "experiments")
  found = [hit for f in sorted(os.listdir(directory)) if f.endswith(".py")
           for hit in restated_defaults(os.path.join(directory, f))]
  assert not found, found


def test_the_check_catches_a_restated_default(tmp_path):
  # The optimize command as it once declared its flags by hand.
  path = tmp_path / "command.py"
  path.write_text(
      "from absl import flags\n"
      "from rtjax.optimize import Settings\n"
      "_B = flags.DEFINE_integer('batch_size', 1, 'Batch size.')\n"
      "_R = flags.DEFINE_list('rung_steps', [], 'Rungs.')\n"
      "_K = flags.DEFINE_list('keep_fractions', ['0.75', '0.5', '0.25'], '')\n"
      "_F = flags.DEFINE_float('final_seconds', Settings.final_seconds, '')\n"
      "_O = flags.DEFINE_integer('batch_size_other', 1, 'Not a field.')\n")
  assert restated_defaults(str(path)) == [
      "command.py:3 --batch_size", "command.py:4 --rung_steps",
      "command.py:5 --keep_fractions"]
