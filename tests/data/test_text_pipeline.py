"""Packed TFDS text: tokenizers, packing, masking across documents, sharding, state."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memarch import data
from memarch.data import text

L = 16


def _epoch(cfg, data_dir, **kw):
  args = dict(split="train", seed=0, global_batch_size=4, data_dir=data_dir,
              shuffle=False, num_epochs=1, drop_remainder=False)
  args.update(kw)
  return list(data.build_iterator(cfg, **args))


def _stream(batches):
  """The token stream the rows cover: inputs, plus the row's last token when visible."""
  out = []
  for batch in batches:
    for x, y, seg in zip(batch["inputs"], batch["targets"], batch["segment_ids"]):
      out.extend(x[seg > 0].tolist())
      if y[-1] != -100:
        out.append(int(y[-1]))
  return out


def test_byte_tokenizer_round_trip():
  tok = text.ByteTokenizer()
  ids = tok.encode("héllo 日本")
  assert ids.dtype == np.int32 and ids.min() >= 3 and ids.max() < 259
  assert tok.decode(np.concatenate([[1], ids, [2, 0]])) == "héllo 日本"
  assert tok.vocab_size == text.BYTE_VOCAB_SIZE == 259
  np.testing.assert_array_equal(text.document_tokens(tok, b"ab"), [1, 3 + 97, 3 + 98, 2])


def test_row_to_example_masks_document_boundaries():
  # Two documents (segments 1, 2) then padding, in a row of 9 tokens.
  row = {"tokens": np.array([1, 10, 11, 2, 1, 20, 2, 0, 0]),
         "tokens_segment_ids": np.array([1, 1, 1, 1, 2, 2, 2, 0, 0]),
         "tokens_positions": np.array([0, 1, 2, 3, 0, 1, 2, 0, 0])}
  ex = text.row_to_example(row)
  np.testing.assert_array_equal(ex["inputs"], [1, 10, 11, 2, 1, 20, 2, 0])
  np.testing.assert_array_equal(ex["targets"], [10, 11, 2, -100, 20, 2, -100, -100])
  np.testing.assert_array_equal(ex["segment_ids"], [1, 1, 1, 1, 2, 2, 2, 0])
  np.testing.assert_array_equal(ex["positions"], [0, 1, 2, 3, 0, 1, 2, 0])


def test_packing_semantics(text_cfg, data_dir, tiny_docs):
  batches = _epoch(text_cfg, data_dir)
  for batch in batches:
    for k, v in batch.items():
      assert v.shape == (4, L) and v.dtype == np.int32, k
    for x, y, seg, pos in zip(batch["inputs"], batch["targets"], batch["segment_ids"],
                              batch["positions"]):
      real = seg > 0
      if not real.any():
        continue
      # Segments are 1, 2, 3... then only padding.
      n = real.sum()
      assert real[:n].all() and not real[n:].any()
      assert seg[0] == 1 and np.all(np.diff(seg[:n]) >= 0) and np.all(np.diff(seg[:n]) <= 1)
      # Positions count within each segment.
      for s in np.unique(seg[real]):
        np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
      # Targets are next tokens of the same document, never across documents.
      for t in range(L - 1):
        if y[t] != -100:
          assert seg[t + 1] == seg[t] > 0 and y[t] == x[t + 1]
        elif seg[t] > 0:
          assert seg[t + 1] != seg[t] or x[t] == text.EOS_ID
      assert np.all(y[x == text.EOS_ID] == -100)
      assert np.all(y[~real] == -100) and np.all(x[~real] == 0)
  # Several documents share a row, and some are split across rows.
  assert max(b["segment_ids"].max() for b in batches) >= 2
  # Byte round trip: the stream decodes back to the documents (TFDS stores them in
  # its own hashed order, so compare as multisets).
  stream = _stream(batches)
  docs = [text.ByteTokenizer().decode(np.array(d)) for d in _split(stream, text.EOS_ID)]
  assert sorted(docs) == sorted(tiny_docs)


def _split(ids, sep):
  out, cur = [], []
  for i in ids:
    if i == sep:
      out.append(cur)
      cur = []
    else:
      cur.append(i)
  return out


def test_process_sharding_and_state(text_cfg, data_dir):
  kw = dict(split="train", seed=1, global_batch_size=4, data_dir=data_dir)
  whole = data.build_iterator(text_cfg, **kw)
  whole_batches = [next(whole) for _ in range(12)]
  for p in range(2):
    part = data.build_iterator(text_cfg, process_index=p, process_count=2, **kw)
    for batch in whole_batches:
      got = next(part)
      for k in batch:
        np.testing.assert_array_equal(got[k], batch[k][2 * p:2 * p + 2])
  # State after k batches, through JSON, continues identically in a fresh iterator.
  it = data.build_iterator(text_cfg, **kw)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  fresh = data.build_iterator(text_cfg, **kw)
  fresh.set_state(state)
  for batch in whole_batches[5:]:
    got = next(fresh)
    for k in batch:
      np.testing.assert_array_equal(got[k], batch[k])


def test_eval_split_and_task_info(text_cfg, data_dir):
  info = data.get_task_info(text_cfg)
  assert info.eval_splits == ("test",) and info.vocab_size == 259 and info.seq_len == L
  batches = _epoch(text_cfg, data_dir, split="test")
  assert len(_split(_stream(batches), text.EOS_ID)) == 10


def test_sentencepiece_tokenizer(text_cfg, data_dir, tiny_docs, tmp_path):
  spm = pytest.importorskip("sentencepiece")
  prefix = str(tmp_path / "sp")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(tiny_docs * 5), model_prefix=prefix, vocab_size=60,
      model_type="bpe", hard_vocab_limit=False, character_coverage=1.0,
      bos_id=1, eos_id=2, pad_id=0, unk_id=3, minloglevel=2)
  cfg = dict(text_cfg, tokenizer=prefix + ".model")
  tok = text.make_tokenizer(cfg["tokenizer"])
  assert data.get_task_info(cfg).vocab_size == tok.vocab_size
  assert tok.decode(tok.encode(tiny_docs[3])) == tiny_docs[3].strip()
  batches = _epoch(cfg, data_dir)
  assert max(b["inputs"].max() for b in batches) < tok.vocab_size
  stream = [i for i in _stream(batches) if i != tok.bos_id]
  docs = [tok.decode(np.array(d)) for d in _split(stream, tok.eos_id)]
  # SentencePiece drops the trailing space of the word-less documents.
  assert sorted(docs) == sorted(d.strip() for d in tiny_docs)
