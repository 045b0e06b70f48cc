"""The README and docs/ARCHITECTURE.md say true things about this tree.

* The plain-orbax snippet of the README (the ```python block after the line
  `<!-- plain-orbax-snippet -->`) runs as written, in a fresh process that
  never imports rtjax, on a real checkpoint.
* Every repository path, `python -m experiments.X` command and dotted
  `rtjax.x.y` name the two documents mention exists.
"""

import ast
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
PATH = re.compile(r"(?<![\w./-])((?:experiments|rtjax|configs|docs|tests)"
                  r"/[\w./-]*)")
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


def test_nothing_outside_the_repository():
  for doc in DOCS:
    assert "../" not in _read(doc), f"{doc} points outside the repository"
