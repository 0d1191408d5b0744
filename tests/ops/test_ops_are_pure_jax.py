"""memarch/ops holds pure JAX: no module there imports Flax (CONVENTIONS.md C1)."""

import ast
import pathlib

OPS = pathlib.Path(__file__).resolve().parents[2] / "memarch" / "ops"


def test_ops_import_no_flax():
  files = sorted(OPS.glob("*.py"))
  assert len(files) >= 3
  for path in files:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      for name in names:
        assert not name.startswith("flax"), f"{path.name} imports {name}"
