"""The README and docs/ARCHITECTURE.md say true things about this tree.

* The plain-orbax snippet of the README (the ```python block after the line
  `<!-- plain-orbax-snippet -->`) runs as written, in a fresh process that
  never imports rtjax, on a real checkpoint.
* Every repository path, `make` target, `python -m experiments.X` command
  and dotted `rtjax.x.y` name the two documents mention exists, and every
  relative markdown link in them and in docs/ resolves inside the repository.
* The README is a map: at most README_MAX_LINES lines, one row per entry
  point in its entry-point table, and no sentence about how the project was
  developed (no commit-like token, no earlier runs or probes).
"""

import ast
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.test_layers import LAYER_OF

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", os.path.join("docs", "ARCHITECTURE.md"))
MARKER = "<!-- plain-orbax-snippet -->"
DIRECTORY = 'directory = "workdirs/default/checkpoints"'
# Appended to the snippet: rtjax is pip-installed (editable) in the venv, so
# "not importable" cannot be arranged; instead nothing may have imported it.
NO_RTJAX = """
import sys as _sys
_loaded = sorted(m for m in _sys.modules if m == "rtjax" or m.startswith("rtjax."))
assert not _loaded, f"the snippet imported rtjax: {_loaded}"
"""


def _read(name):
  with open(os.path.join(REPO, name), encoding="utf-8") as f:
    return f.read()


def _snippet() -> str:
  readme = _read("README.md")
  assert readme.count(MARKER) == 1, f"README.md needs one line {MARKER}"
  after = readme.split(MARKER, 1)[1]
  match = re.match(r"\s*```python\n(.*?)\n```", after, re.S)
  assert match, f"the line {MARKER} must be followed by a ```python block"
  return match.group(1)


def _run(code: str, cwd) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return subprocess.run([sys.executable, "-c", code + NO_RTJAX],
                        capture_output=True, text=True, cwd=cwd, env=env,
                        timeout=300)


@pytest.mark.parametrize("how", ["as_written", "directory_replaced"])
def test_plain_orbax_snippet_runs_without_rtjax(trained, tmp_path, how):
  config, workdir, result = trained
  code = _snippet()
  assert DIRECTORY in code, f"the snippet should set {DIRECTORY}"
  if how == "as_written":
    # The exact text, from a directory holding workdirs/default/checkpoints.
    shutil.copytree(workdir / "checkpoints",
                    tmp_path / "workdirs" / "default" / "checkpoints")
    cwd = tmp_path
  else:
    code = code.replace(
        DIRECTORY, f"directory = {str(workdir / 'checkpoints')!r}")
    cwd = "/"
  out = _run(code, cwd)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"step {result.step} model {config.model.name}" in out.stdout, (
      out.stdout)


# Repository paths: a top-level directory name not preceded by a path or word
# character (so gs://bucket/rtjax/... and workdirs/... are not taken).
PATH = re.compile(r"(?<![\w./-])((?:experiments|rtjax|configs|docs|tests|\.ci)"
                  r"/[\w./-]*|Makefile|pyproject\.toml)")
PYTHON_M = re.compile(r"python -m ([\w.]+)")
EXPERIMENT = re.compile(r"(?<![\w./-])experiments\.(\w+)")
DOTTED = re.compile(r"(?<![\w./-])rtjax(?:\.\w+)+")


def _mentions(pattern):
  return sorted({(doc, m.group(1) if pattern.groups else m.group(0))
                 for doc in DOCS for m in pattern.finditer(_read(doc))})


def test_docs_exist():
  for doc in DOCS:
    assert os.path.isfile(os.path.join(REPO, doc)), doc


def test_every_path_mentioned_exists():
  found = _mentions(PATH)
  assert found
  missing = [f"{doc}: {path}" for doc, path in found
             if not os.path.exists(os.path.join(REPO, path.rstrip(".")))]
  assert not missing, "paths that do not exist:\n  " + "\n  ".join(missing)


def test_every_command_names_an_experiment():
  modules = _mentions(PYTHON_M)
  assert modules
  bad = [f"{doc}: python -m {m}" for doc, m in modules
         if not m.startswith("experiments.")
         or not os.path.isfile(os.path.join(REPO, *m.split(".")) + ".py")]
  bad += [f"{doc}: experiments.{m}" for doc, m in _mentions(EXPERIMENT)
          if not os.path.isfile(os.path.join(REPO, "experiments", m + ".py"))]
  assert not bad, "no such entry point:\n  " + "\n  ".join(bad)


def _module_file(parts):
  base = os.path.join(REPO, *parts)
  for path in (base + ".py", os.path.join(base, "__init__.py")):
    if os.path.isfile(path):
      return path
  return None


def _module_names(path):
  """Names a module defines or imports at its top level."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), filename=path)
  names, todo = set(), list(tree.body)
  while todo:
    node = todo.pop()
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names.update((a.asname or a.name).split(".")[0] for a in node.names)
    elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
      names.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name)
                   and isinstance(n.ctx, ast.Store))
    elif isinstance(node, (ast.If, ast.Try, ast.ExceptHandler, ast.With)):
      todo.extend(ast.iter_child_nodes(node))
  return names


def test_every_dotted_rtjax_name_exists():
  """rtjax.a.b.c: the longest prefix that is a module must exist, and the
  next name must be defined or imported in it. LAYERS reserves places for
  modules not written yet (tests/test_layers.py); those may be named."""
  bad = []
  for doc, name in _mentions(DOTTED):
    parts = name.split(".")
    depth = max(i for i in range(1, len(parts) + 1) if _module_file(parts[:i]))
    if depth == len(parts):
      continue  # a module
    if depth == 1 and ".".join(parts[:2]) in LAYER_OF:
      continue  # a place LAYERS reserves (rtjax.serve, rtjax.optimize)
    if parts[depth] not in _module_names(_module_file(parts[:depth])):
      bad.append(f"{doc}: {name} ({parts[depth]} is neither a module nor a "
                 f"name in {'.'.join(parts[:depth])})")
  assert not bad, "names that do not exist:\n  " + "\n  ".join(bad)


MAKE = re.compile(r"(?<![\w-])make ([\w-]+)")


def test_every_make_target_exists():
  makefile = _read("Makefile")
  targets = [(doc, t) for doc, t in _mentions(MAKE)]
  assert targets
  missing = [f"{doc}: make {t}" for doc, t in targets
             if not re.search(rf"^{re.escape(t)}:", makefile, re.M)]
  assert not missing, "no such Makefile target:\n  " + "\n  ".join(missing)


def test_nothing_outside_the_repository():
  for doc in DOCS:
    assert "../" not in _read(doc), f"{doc} points outside the repository"


README_MAX_LINES = 220
TABLE_HEADER = "| entry point |"
ENTRY_CELL = re.compile(r"^`(experiments\.\w+|experiments/[\w.]+\.sh)`$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A hex run as long as a short commit name, with a letter and a digit in it
# (so neither a word like "defaced" nor a plain number is taken).
COMMIT_LIKE = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")
HISTORY_WORDS = ("one-off", "earlier run", "previous recording", "issue")


def _entry_points():
  """What the tree offers: experiments/*.py with a main (cli.py is the shared
  flags, not a command) and every experiments/*.sh."""
  found = set()
  for path in glob.glob(os.path.join(REPO, "experiments", "*.py")):
    name = os.path.basename(path)[:-3]
    with open(path, encoding="utf-8") as f:
      if name != "cli" and re.search(r"^def main\(", f.read(), re.M):
        found.add(f"experiments.{name}")
  found.update(f"experiments/{os.path.basename(p)}"
               for p in glob.glob(os.path.join(REPO, "experiments", "*.sh")))
  return found


def _entry_table():
  """{entry point: its row's cells} of the README's entry-point table."""
  lines = _read("README.md").splitlines()
  starts = [i for i, line in enumerate(lines) if line.startswith(TABLE_HEADER)]
  assert len(starts) == 1, f"README.md needs one table headed {TABLE_HEADER!r}"
  rows = {}
  for line in lines[starts[0] + 2:]:
    if not line.startswith("|"):
      break
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    match = ENTRY_CELL.match(cells[0])
    assert match, f"first cell names no entry point: {line}"
    assert match.group(1) not in rows, f"two rows for {match.group(1)}"
    rows[match.group(1)] = cells
  return rows


def test_readme_is_short():
  lines = len(_read("README.md").splitlines())
  assert lines <= README_MAX_LINES, f"README.md has {lines} lines"


def test_every_entry_point_has_its_row():
  expected, rows = _entry_points(), _entry_table()
  assert "experiments.main" in expected and "experiments/device_check.sh" in expected
  assert set(rows) == expected, (
      f"no row: {sorted(expected - set(rows))}; "
      f"no such entry point: {sorted(set(rows) - expected)}")
  for name, cells in rows.items():
    assert len(cells) == 4, f"{name}: want 4 cells, got {cells}"
    runs = f"bash {name}" if name.endswith(".sh") else f"python -m {name}"
    assert runs in cells[2], f"{name}: its command cell does not run it"
    assert cells[3] == "-" or LINK.search(cells[3]), (
        f"{name}: results cell is neither '-' nor links")


def test_every_relative_link_resolves():
  docs = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in
                                glob.glob(os.path.join(REPO, "docs", "*.md")))
  bad = []
  for doc in docs:
    for target in LINK.findall(_read(doc)):
      if re.match(r"[a-z]+:", target) or target.startswith("#"):
        continue
      path = os.path.normpath(os.path.join(REPO, os.path.dirname(doc),
                                           target.split("#")[0]))
      if not path.startswith(REPO + os.sep) or not os.path.exists(path):
        bad.append(f"{doc}: {target}")
  assert not bad, "links that do not resolve:\n  " + "\n  ".join(bad)


def test_readme_tells_no_history():
  readme = _read("README.md")
  tokens = COMMIT_LIKE.findall(readme)
  assert not tokens, f"commit-like tokens in README.md: {tokens}"
  words = [w for w in HISTORY_WORDS if w in readme.lower()]
  assert not words, f"README.md tells how the project was developed: {words}"
