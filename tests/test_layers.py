"""Import layering of rtjax, checked by parsing source (no jax import, <1 s).

Every `.py` file under rtjax/ is parsed with `ast`; every import of an rtjax
module (top-level, inside functions and methods, under `if TYPE_CHECKING`,
relative, `import rtjax.x.y`, `from rtjax.x import y` with y a submodule, and
`importlib.import_module("rtjax...")` with a literal name) becomes an edge
importer -> imported. The tests then fail on edges that run upward in LAYERS,
on import cycles, on imports of `experiments` or `tests`, and on rtjax modules
that no layer claims.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "rtjax"

# The layering, top (1) to bottom (9). A module may import modules of its own
# layer or of any layer below it (a larger number), never one above it.
# Why this order:
#   * a checkpoint path alone must rebuild a model (the stamp names the model
#     and config), so rtjax.checkpoint sits below everything that consumes a
#     checkpoint (compress, train, infer, pipeline, bench, serve) and above
#     only what it needs to rebuild one (config, models, data);
#   * the pipeline calls the trainer (and compress and infer), so it sits
#     above them; compare and bench read what pipelines produce;
#   * rtjax.target compiles serving and training executables for a TPU
#     slice that is not attached (rtjax.infer, rtjax.train) and reuses the
#     roofline of rtjax.bench beside it; a launch pre-flight asks it;
#   * serving never imports training: rtjax.serve, like rtjax.optimize, is a
#     consumer at the very top, and nothing below imports it.
# rtjax.optimize and rtjax.serve may not exist yet; they keep their place so
# that the first commit that adds them is already checked.
LAYERS = (
    (1, ("rtjax.optimize", "rtjax.serve")),
    (2, ("rtjax.compare", "rtjax.bench", "rtjax.target")),
    (3, ("rtjax.pipeline",)),
    (4, ("rtjax.infer",)),
    (5, ("rtjax.train",)),
    (6, ("rtjax.compress",)),
    (7, ("rtjax.checkpoint",)),
    (8, ("rtjax.config",)),
    (9, ("rtjax.models", "rtjax.data", "rtjax.timing", "rtjax.errors",
         "rtjax.distributed", "rtjax.tpu", "rtjax.accelerators", "rtjax")),
)
# Layer 9 holds leaves: within it, each unit may import only the units listed
# here (besides itself). models and data build on errors and timing but not on
# each other; distributed uses errors only; accelerators (Cloud TPU facts: the
# launch plan, the roofline and target compiles read them) uses errors only,
# and tpu (the launch plan) errors and accelerators; the package root imports
# nothing (importing any rtjax module runs it).
LEAF_LAYER = 9
LEAF_IMPORTS = {
    "rtjax.models": ("rtjax.errors", "rtjax.timing"),
    "rtjax.data": ("rtjax.errors", "rtjax.timing"),
    "rtjax.timing": (),
    "rtjax.errors": (),
    "rtjax.distributed": ("rtjax.errors",),
    "rtjax.tpu": ("rtjax.errors", "rtjax.accelerators"),
    "rtjax.accelerators": ("rtjax.errors",),
    "rtjax": (),
}
# Top-level names rtjax must never import: they depend on rtjax, not the
# other way round.
FORBIDDEN = ("experiments", "tests")

LAYER_OF = {unit: layer for layer, units in LAYERS for unit in units}


def _unit(module):
  """The LAYERS entry a dotted module name belongs to: rtjax.x for
  rtjax.x[.y...], `rtjax` for the package root; None outside rtjax."""
  parts = module.split(".")
  if parts[0] != PACKAGE:
    return None
  return ".".join(parts[:2])


def _discover():
  """{module name: (path, is_package)} for every .py file under rtjax/."""
  modules = {}
  root = os.path.join(REPO, PACKAGE)
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
    for filename in sorted(filenames):
      if not filename.endswith(".py"):
        continue
      path = os.path.join(dirpath, filename)
      rel = os.path.relpath(path, REPO)[:-3].split(os.sep)
      is_package = rel[-1] == "__init__"
      if is_package:
        rel = rel[:-1]
      modules[".".join(rel)] = (path, is_package)
  return modules


def _imports(module, path, is_package, modules):
  """[(imported module, line)] for every import statement in a file."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), filename=path)
  package = module if is_package else module.rpartition(".")[0]
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        found.append((alias.name, node.lineno))
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")
        base = base[:len(base) - (node.level - 1)]
        base = ".".join(base + ([node.module] if node.module else []))
      else:
        base = node.module
      for alias in node.names:
        sub = f"{base}.{alias.name}"
        # `from rtjax.pipeline import stages` imports the submodule.
        found.append((sub if sub in modules else base, node.lineno))
    elif (isinstance(node, ast.Call) and node.args
          and isinstance(node.args[0], ast.Constant)
          and isinstance(node.args[0].value, str)
          and ((isinstance(node.func, ast.Attribute)
                and node.func.attr == "import_module")
               or (isinstance(node.func, ast.Name)
                   and node.func.id in ("import_module", "__import__")))):
      found.append((node.args[0].value, node.lineno))
  return found


def _graph():
  """(modules, edges): edges is {(importer, imported): first line}."""
  modules = _discover()
  edges = {}
  for module, (path, is_package) in sorted(modules.items()):
    for imported, line in _imports(module, path, is_package, modules):
      edges.setdefault((module, imported), line)
  return modules, edges


def _where(module, modules, line):
  return f"{os.path.relpath(modules[module][0], REPO)}:{line}"


def test_every_rtjax_module_has_a_layer():
  modules, _ = _graph()
  unplaced = sorted(m for m in modules if _unit(m) not in LAYER_OF)
  assert not unplaced, (
      "rtjax modules outside the layering: " + ", ".join(unplaced) + ". "
      "Place each new top-level module or package in LAYERS at the top of "
      "tests/test_layers.py (below everything that imports it, above "
      "everything it imports) and say why in the comment there.")


def test_no_upward_imports():
  modules, edges = _graph()
  bad = []
  for (importer, imported), line in sorted(edges.items()):
    src, dst = _unit(importer), _unit(imported)
    if dst is None or src not in LAYER_OF:
      continue  # outside rtjax, or reported by the test above
    if dst not in LAYER_OF:
      bad.append(f"{importer} -> {imported} (imports {dst}, which is in no "
                 f"layer; place it in LAYERS) at "
                 f"{_where(importer, modules, line)}")
      continue
    a, b = LAYER_OF[src], LAYER_OF[dst]
    if b < a:
      bad.append(f"{importer} -> {imported} (layer {a} imports layer {b} "
                 f"above it) at {_where(importer, modules, line)}")
    elif a == b == LEAF_LAYER and src != dst and dst not in LEAF_IMPORTS[src]:
      allowed = ("only " + ", ".join(LEAF_IMPORTS[src]) if LEAF_IMPORTS[src]
                 else "no other layer-9 module")
      bad.append(f"{importer} -> {imported} (layer 9 leaf {src} may import "
                 f"{allowed}) at {_where(importer, modules, line)}")
  assert not bad, "imports against the layering:\n  " + "\n  ".join(bad)


def test_rtjax_never_imports_experiments_or_tests():
  modules, edges = _graph()
  bad = [f"{importer} -> {imported} at {_where(importer, modules, line)}"
         for (importer, imported), line in sorted(edges.items())
         if imported.split(".")[0] in FORBIDDEN]
  assert not bad, ("rtjax must not import " + " or ".join(FORBIDDEN) + ":\n  "
                   + "\n  ".join(bad))


def _cycles(nodes, succ):
  """One cycle path per strongly connected component with more than one
  module (Tarjan, iterative)."""
  index, low, on_stack, stack, sccs = {}, {}, set(), [], []
  counter = 0
  for root in nodes:
    if root in index:
      continue
    work = [(root, iter(succ[root]))]
    index[root] = low[root] = counter
    counter += 1
    stack.append(root)
    on_stack.add(root)
    while work:
      node, it = work[-1]
      advanced = False
      for nxt in it:
        if nxt not in index:
          index[nxt] = low[nxt] = counter
          counter += 1
          stack.append(nxt)
          on_stack.add(nxt)
          work.append((nxt, iter(succ[nxt])))
          advanced = True
          break
        if nxt in on_stack:
          low[node] = min(low[node], index[nxt])
      if advanced:
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        scc = []
        while True:
          top = stack.pop()
          on_stack.discard(top)
          scc.append(top)
          if top == node:
            break
        if len(scc) > 1:
          sccs.append(sorted(scc))
  paths = []
  for scc in sorted(sccs):
    members, start = set(scc), scc[0]
    # Shortest path start -> ... -> start inside the component (BFS).
    parent, frontier, end = {}, [start], None
    while frontier and end is None:
      nxt_frontier = []
      for node in frontier:
        for nxt in succ[node]:
          if nxt not in members:
            continue
          if nxt == start:
            end = node
            break
          if nxt not in parent:
            parent[nxt] = node
            nxt_frontier.append(nxt)
        if end is not None:
          break
      frontier = nxt_frontier
    path = [start]
    node = end
    while node != start:
      path.append(node)
      node = parent[node]
    path = [start] + path[:0:-1] + [start]
    paths.append((path, scc))
  return paths


def test_no_import_cycles():
  modules, edges = _graph()
  succ = {m: [] for m in modules}
  for importer, imported in sorted(edges):
    if imported in modules and imported != importer:
      succ[importer].append(imported)
  cycles = _cycles(sorted(modules), succ)
  assert not cycles, "import cycles:\n  " + "\n  ".join(
      " -> ".join(path) + f"  (component: {', '.join(scc)})"
      for path, scc in cycles)


# experiments/*.py hold flags and wiring; logic belongs in rtjax/. A heuristic
# guard: more than this many top-level helpers (functions other than `main`),
# or any class, means logic has crept in. cli.py is the shared flag layer.
MAX_EXPERIMENT_HELPERS = 2
EXPERIMENTS_EXEMPT = ("cli.py",)


def _top_level_defs(body):
  """Function and class definitions at module level, including those under
  top-level if/try/with blocks (not those nested in functions or classes)."""
  for node in body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      yield node
    elif isinstance(node, (ast.If, ast.With, ast.AsyncWith, ast.For,
                           ast.While)):
      yield from _top_level_defs(node.body)
      yield from _top_level_defs(node.orelse)
    elif isinstance(node, ast.Try):
      yield from _top_level_defs(node.body)
      for handler in node.handlers:
        yield from _top_level_defs(handler.body)
      yield from _top_level_defs(node.orelse)
      yield from _top_level_defs(node.finalbody)


def test_experiments_hold_wiring_only():
  directory = os.path.join(REPO, "experiments")
  found, bad = [], []
  for filename in sorted(os.listdir(directory)):
    if not filename.endswith(".py") or filename in EXPERIMENTS_EXEMPT:
      continue
    path = os.path.join(directory, filename)
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), filename=path)
    defs = list(_top_level_defs(tree.body))
    helpers = [d.name for d in defs
               if not isinstance(d, ast.ClassDef) and d.name != "main"]
    classes = [d.name for d in defs if isinstance(d, ast.ClassDef)]
    found.append(f"experiments/{filename}: {len(helpers)} helper(s) "
                 f"{helpers}, {len(classes)} class(es) {classes}")
    if len(helpers) > MAX_EXPERIMENT_HELPERS or classes:
      bad.append(found[-1])
  print("\n".join(found))
  assert not bad, (
      f"experiments/ should hold flags and wiring only (at most "
      f"{MAX_EXPERIMENT_HELPERS} helper functions besides main, no classes); "
      "move the logic into rtjax/:\n  " + "\n  ".join(bad))


MAX_FUNCTION_LINES = 60


def test_no_function_hides_its_steps():
  """Every function in rtjax/ and experiments/ fits in 60 lines (from its
  `def` to its last line, docstring included): a longer one is split into
  named steps that say what it does."""
  long = []
  for top in ("rtjax", "experiments"):
    for root, _, files in os.walk(os.path.join(REPO, top)):
      for filename in sorted(f for f in files if f.endswith(".py")):
        path = os.path.join(root, filename)
        with open(path, encoding="utf-8") as f:
          tree = ast.parse(f.read(), filename=path)
        for node in ast.walk(tree):
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
              long.append(f"{os.path.relpath(path, REPO)}:{node.lineno} "
                          f"{node.name}: {lines} lines")
  assert not long, (f"functions over {MAX_FUNCTION_LINES} lines:\n  "
                    + "\n  ".join(long))


if __name__ == "__main__":
  raise SystemExit(pytest.main(["-q", __file__]))
