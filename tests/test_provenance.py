"""A results file says how it was measured, and a rerun keeps its notes."""

from rtjax.bench import provenance


def test_rerun_replaces_the_table_and_keeps_the_notes(tmp_path):
  path = tmp_path / "results" / "x.md"
  provenance.write_results(path, "| a |\n| 1 |\n")
  first = path.read_text()
  assert first.startswith("Command: `") and "| 1 |" in first
  path.write_text(first + "\n## Notes\n\nAn earlier run measured 2.\n")
  provenance.write_results(path, "| a |\n| 3 |\n")
  second = path.read_text()
  assert "| 3 |" in second and "| 1 |" not in second
  assert second.endswith("## Notes\n\nAn earlier run measured 2.\n")
  assert second.index("| 3 |") < second.index("## Notes")
