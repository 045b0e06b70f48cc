"""What a search has measured and decided, kept in its workdir as JSON, so
that a search killed at any moment (SIGKILL included) and started again
reuses every finished measurement and decision instead of redoing it, and
reaches the same choice from the same numbers.

One file, rewritten whole through a temporary file and an atomic rename: a
kill leaves either the old or the new contents, never half of one.
"""

from __future__ import annotations

import json
import os

from etils import epath


class SearchStore:
  """A {key: JSON value} record at `<workdir>/search_state.json`."""

  def __init__(self, workdir: epath.PathLike):
    self.path = epath.Path(workdir) / "search_state.json"
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.data = json.loads(self.path.read_text()) if self.path.exists() else {}

  def __contains__(self, key: str) -> bool:
    return key in self.data

  def get(self, key: str, default=None):
    return self.data.get(key, default)

  def put(self, key: str, value) -> None:
    self.data[key] = value
    tmp = self.path.parent / (self.path.name + ".tmp")
    tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
    os.replace(tmp, self.path)

