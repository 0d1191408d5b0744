"""Language-model data from any TFDS text dataset: tokenise, then pack.

Tokenizers:

* ``"byte"`` (default): UTF-8 bytes shifted by 3, so ids are ``pad=0, bos=1, eos=2``
  and ``3 + byte`` for the 256 byte values: ``BYTE_VOCAB_SIZE = 259``.
* a path to a SentencePiece ``.model`` file (``sentencepiece`` is imported only then):
  the model's own ids, with its bos/eos where it defines them. Padding slots hold 0
  whatever the model calls id 0; they are masked by ``segment_ids == 0`` and -100
  targets, so the id does not matter.

Packing (``pack_documents``): each document becomes ``[bos] ids [eos]``; documents
are concatenated in order and cut into rows of ``seq_len + 1`` tokens (grain's
``ConcatThenSplitIterDataset``). A document cut at a row end continues at the start of
the next row as a new segment whose positions restart at 0. A row becomes

* ``inputs = row[:-1]``, ``targets = row[1:]``;
* ``segment_ids``: 1, 2, 3... per document within the row, 0 on padding;
* ``positions``: the position of each token within its (piece of) document;
* ``targets`` = -100 where the next token is padding or starts another document, so no
  target crosses a document boundary.
"""

from __future__ import annotations

from typing import Any, Protocol

import grain
import numpy as np

from memarch.data.mqar import IGNORE

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3
BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET


class Tokenizer(Protocol):
  """What the packer needs from a tokenizer.

  Attributes:
    vocab_size: number of ids the tokenizer can emit.
    bos_id: id put before each document, or None.
    eos_id: id put after each document, or None.
  """

  vocab_size: int
  bos_id: int | None
  eos_id: int | None

  def encode(self, text: str | bytes) -> np.ndarray:
    """Returns int32 ids of ``text`` without bos/eos."""

  def decode(self, ids: np.ndarray) -> str:
    """Returns the text of ``ids``, skipping special ids."""


class ByteTokenizer:
  """UTF-8 bytes shifted by ``BYTE_OFFSET``; ids 0, 1, 2 are pad, bos, eos.

  Attributes:
    vocab_size: 259.
    bos_id: 1.
    eos_id: 2.
  """

  vocab_size = BYTE_VOCAB_SIZE
  bos_id = BOS_ID
  eos_id = EOS_ID

  def encode(self, text: str | bytes) -> np.ndarray:
    """Returns int32 ids of ``text`` (str is UTF-8 encoded first)."""
    if isinstance(text, str):
      text = text.encode("utf-8")
    return np.frombuffer(bytes(text), dtype=np.uint8).astype(np.int32) + BYTE_OFFSET

  def decode(self, ids: np.ndarray) -> str:
    """Returns the text of ``ids``; special ids are dropped, bad UTF-8 replaced."""
    ids = np.asarray(ids)
    ids = ids[ids >= BYTE_OFFSET] - BYTE_OFFSET
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A SentencePiece model read from a ``.model`` file.

  Attributes:
    vocab_size: the model's piece count.
    bos_id: the model's bos id, or None if it has none.
    eos_id: the model's eos id, or None if it has none.
  """

  def __init__(self, model_path: str):
    """Loads the model.

    Args:
      model_path: path of the serialised SentencePiece model.
    """
    import sentencepiece  # pylint: disable=g-import-not-at-top

    with open(model_path, "rb") as f:
      self._sp = sentencepiece.SentencePieceProcessor(model_proto=f.read())
    self.vocab_size = int(self._sp.get_piece_size())
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

  def encode(self, text: str | bytes) -> np.ndarray:
    """Returns int32 ids of ``text``."""
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids: np.ndarray) -> str:
    """Returns the text of ``ids``."""
    return self._sp.decode([int(i) for i in np.asarray(ids)])


def make_tokenizer(spec: str = "byte") -> Tokenizer:
  """Returns the tokenizer named by ``spec``: ``"byte"`` or a SentencePiece path."""
  return ByteTokenizer() if spec == "byte" else SentencePieceTokenizer(spec)


def document_tokens(tokenizer: Tokenizer, text: Any) -> np.ndarray:
  """Returns ``[bos] ids [eos]`` (where defined) as int32."""
  if isinstance(text, np.ndarray):
    text = text.item()
  parts = [tokenizer.encode(text)]
  if tokenizer.bos_id is not None:
    parts.insert(0, np.array([tokenizer.bos_id], np.int32))
  if tokenizer.eos_id is not None:
    parts.append(np.array([tokenizer.eos_id], np.int32))
  return np.concatenate(parts).astype(np.int32)


def row_to_example(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Turns a packed row of ``seq_len + 1`` tokens into model inputs and targets.

  Args:
    row: ``{"tokens", "tokens_segment_ids", "tokens_positions"}``, int [seq_len + 1].

  Returns:
    ``{"inputs", "targets", "segment_ids", "positions"}``, int32 [seq_len].
  """
  tokens = np.asarray(row["tokens"], np.int32)
  seg = np.asarray(row["tokens_segment_ids"], np.int32)
  pos = np.asarray(row["tokens_positions"], np.int32)
  same_doc = (seg[1:] == seg[:-1]) & (seg[1:] > 0)
  return {
      "inputs": np.where(seg[:-1] > 0, tokens[:-1], PAD_ID).astype(np.int32),
      "targets": np.where(same_doc, tokens[1:], IGNORE).astype(np.int32),
      "segment_ids": seg[:-1],
      "positions": np.where(seg[:-1] > 0, pos[:-1], 0).astype(np.int32),
  }


def pack_documents(docs: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """Packs ``{"tokens": int32 [n]}`` documents into examples of length ``seq_len``.

  Args:
    docs: the tokenised documents, each with bos/eos already added.
    seq_len: the model's sequence length; rows hold ``seq_len + 1`` tokens.

  Returns:
    An IterDataset of ``row_to_example`` dicts; its iterator state is checkpointable.
  """
  packed = grain.experimental.ConcatThenSplitIterDataset(
      docs, length_struct={"tokens": seq_len + 1}, split_full_length_features=True)
  return packed.map(row_to_example)
