"""benchmarks/hcam_ballet_probe.py: the selection statistics, by hand and on a model whose top-k reads every chunk."""

from __future__ import annotations

import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import hcam_ballet_probe as probe_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from configs.ballet import hcam as hcam_config  # noqa: E402  pylint: disable=g-import-not-at-top


def test_selection_stats_by_hand():
  # Given C = 16 and four episodes' top-3 at the query frame:
  #   0: the dance starts at frame 32 (chunk 2 only); picks 5, 2, 3 with the most weight on 5;
  #   1: the dance starts at 40 and straddles chunks 2 and 3; picks 3 (largest) and 4 (the chunk after it);
  #   2: the dance starts at 0 (chunk 0); chunk 0 is picked but masked (weight 0), chunk 1 is picked;
  #   3: nothing readable (all weights 0).
  weights = np.array([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
  indices = np.array([[5, 2, 3], [3, 4, 7], [0, 1, 2], [0, 1, 2]])
  start = np.array([32, 40, 0, 0])
  s = probe_lib.selection_stats(weights, indices, start, 16)
  np.testing.assert_array_equal(s["hit"], [True, True, False, False])
  np.testing.assert_array_equal(s["top1"], [False, True, False, False])
  np.testing.assert_allclose(s["w"], [0.3, 0.6, 0.0, 0.0])
  np.testing.assert_array_equal(s["next"], [True, True, True, False])


def test_probe_with_a_top_k_over_every_chunk_always_finds_the_dance():
  # Given 2 dancers / delay 16 (65 frames: 4 complete chunks before the query frame) and top-4: every chunk is read
  config = hcam_config.get_config("runlocal,dancers=2,delay=16")
  assert dict(dict(config.model.mixer_options)["hcam"])["top_k"] == 4
  # When the probe runs 12 test episodes at initialisation (two forward passes)
  res = probe_lib.probe(config, None, rows=12, batch=8)
  # Then every layer holds both the queried dance (chunk 0 or 2) and the chunk after it, with weights in (0, 1]
  layers = [k.split("/", 1)[1] for k in res if k.startswith("hit/")]
  assert layers == [f"block_{i}" for i in range(4)]
  assert res["correct"].shape == res["dance"].shape == (12,) and set(res["dance"]) == {0, 1}
  for name in layers:
    assert res[f"hit/{name}"].all() and res[f"next/{name}"].all()
    assert np.all((res[f"w/{name}"] > 0) & (res[f"w/{name}"] <= 1 + 1e-6))
