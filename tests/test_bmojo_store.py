"""benchmarks/bmojo_store.py: the store statistics by hand, and on a store that keeps every token."""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bmojo_store  # noqa: E402  pylint: disable=g-import-not-at-top
from configs.mqar import bmojo as bmojo_config  # noqa: E402  pylint: disable=g-import-not-at-top


def test_position_shares_by_hand():
  # Given kv = 4 (context [0, 8): keys 0, 2, 4, 6; values 1, 3, 5, 7) and two rows of 6 slots:
  #   row 0 holds key 0, value 1 (pair 0), value 3 (pair 1), key 0 again, a query token 9, and an empty slot;
  #   row 1 holds key 4, key 6, value 7 (pairs 2, 3) and three query tokens.
  positions = np.array([[0, 1, 3, 0, 9, -1], [4, 6, 7, 10, 11, 12]])
  s = bmojo_store.position_shares(positions, kv=4)
  # Then 4 of 5 and 3 of 6 valid entries are context tokens, and the means over rows are:
  assert s["share"] == pytest.approx(7 / 11)
  assert s["keys"] == pytest.approx((1 + 2) / 2 / 4)
  assert s["values"] == pytest.approx((2 + 1) / 2 / 4)
  assert s["pairs"] == pytest.approx((2 + 2) / 2 / 4)


def test_a_store_that_keeps_every_token_holds_every_pair(tmp_path):
  # Given L = 64, 8 pairs, chunks of 8 writing all 8 tokens, a FIFO of 8 chunks: nothing is dropped or evicted;
  config = bmojo_config.get_config("runlocal,memory_size=64,k_sel=8,chunk_size=8")
  config.input.data_dir, config.input.num_train, config.input.num_test = str(tmp_path), 64, 16
  # When the script runs 16 test rows at initialisation;
  shares = bmojo_store.store_context_share(config, None, rows=16)
  # Then both layers hold every key, value and pair, and the 16 context tokens are 16 of the 64 entries.
  assert len(shares) == 2
  for s in shares:
    assert s == pytest.approx({"share": 16 / 64, "keys": 1.0, "values": 1.0, "pairs": 1.0})


def test_steps_flag_values(tmp_path):
  # --steps: the newest checkpoint (None), a list, or every checkpoint of the workdir (none here).
  assert bmojo_store._steps(str(tmp_path), "newest") == [None]  # pylint: disable=protected-access
  assert bmojo_store._steps(str(tmp_path), "1750,3000") == [1750, 3000]  # pylint: disable=protected-access
  assert bmojo_store._steps(str(tmp_path), "all") == []  # pylint: disable=protected-access
