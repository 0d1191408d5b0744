"""Every colab in ``colabs/`` executes top to bottom, at the small size (``MEMARCH_COLAB_SMALL=1``)."""

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

COLABS = sorted((pathlib.Path(__file__).resolve().parents[1] / "colabs").glob("*.ipynb"))


def test_there_are_colabs():
  assert COLABS, "colabs/ has no notebooks"


@pytest.mark.parametrize("path", COLABS, ids=[p.stem for p in COLABS])
def test_colab_executes(path, monkeypatch):
  # The kernel inherits this environment: small sizes, and CPU only (no 8 simulated devices).
  monkeypatch.setenv("MEMARCH_COLAB_SMALL", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "").strip())
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    assert not cell.get("outputs"), f"{path.name}: save the notebook without outputs"
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent.parent)}})
  client.execute()  # raises CellExecutionError naming the failing cell
