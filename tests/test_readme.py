"""The README's quick start runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _quick_start_blocks():
  text = README.read_text()
  section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_quick_start_runs(capsys):
  blocks = _quick_start_blocks()
  assert len(blocks) >= 2
  namespace = {}
  exec(compile("\n".join(blocks), str(README), "exec"), namespace)  # pylint: disable=exec-used
  out = capsys.readouterr().out
  assert "(2, 100, 64) (2, 1, 64) (2, 31, 4, 16)" in out
  assert namespace["logits"].shape == (1, 8, 256)
