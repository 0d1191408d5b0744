"""A supervised ballet-like recall task (spec ``hcam.md`` §11.2): watch N dances, then say who danced one of them.

The task keeps the memory demand of DeepMind's Ballet environment (Lampinen et al., 2021) and drops the RL and
the vision. Everything here is ours; nothing is taken from the reference environment (its motion table included).

* **Room.** 8 home slots; a dancer moves inside the 3x3 box around its home. Slot ``s`` is rendered as 10 dims
  ``10 s .. 10 s + 9``: a one-hot of its cell ``(row + 1) * 3 + (col + 1)`` when the slot has a dancer, else the
  "absent" flag ``10 s + 9``.
* **Motions.** ``n_motions`` closed 16-step walks over the 8 compass directions (:data:`DIRECTIONS`, (row, col)),
  drawn once from ``library_seed`` by :func:`make_library`; every walk stays in the box and returns home.
* **Episode** (:func:`episode`). ``N`` dancers, in random slots, perform distinct random motions one after the
  other: 16 move frames, then ``delay`` frames at rest. A final query frame carries only the one-hot of one of the
  performed motions (dims ``80 + m``); the label is the slot whose dancer performed it. So the input is
  ``[N (16 + delay) + 1, 93]`` and chance is ``1 / N`` (a model that knows only which slots are occupied).

Knobs beyond the spec's defaults (ours): ``noise_p`` flips each of the 9 cell dims of every slot of a watch frame
independently with that probability (the absent flags and the query frame are never noisy); ``phase_offset = P``
draws ``r`` uniformly from ``0..P`` and puts ``r`` extra rest frames before the first dance and ``P - r`` after the
last one, so dances straddle chunk borders while the length stays ``N (16 + delay) + P + 1`` (``P = C - 1`` gives
the spec's "0..C-1 idle frames prepended").
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np

NUM_SLOTS = 8
DANCE_LEN = 16
MAX_MOTIONS = 13
SLOT_DIMS = 10            # 9 cells + the absent flag
BOARD_DIMS = NUM_SLOTS * SLOT_DIMS
NUM_FEATURES = BOARD_DIMS + MAX_MOTIONS  # 93
IGNORE = -100
TEST_SEED_OFFSET = 2**31

# (row, col) steps in the order N, NE, E, SE, S, SW, W, NW.
DIRECTIONS = np.array([(-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1)], np.int64)

LEVELS = ((2, 16), (4, 16), (8, 16), (2, 48), (4, 48), (8, 48))  # (num_dancers, delay): the paper's six levels


def seq_len(num_dancers: int, delay: int, phase_offset: int = 0) -> int:
  """Frames of an episode: ``N (16 + delay) + phase_offset + 1`` (the last one is the query)."""
  return num_dancers * (DANCE_LEN + delay) + phase_offset + 1


def check_args(num_dancers: int, delay: int, n_motions: int = MAX_MOTIONS, noise_p: float = 0.0,
               phase_offset: int = 0, prefix: str = "") -> None:
  """Raises a ValueError naming the first bad field (``prefix`` is prepended, e.g. ``"input."``).

  Args:
    num_dancers: N, in [1, 8].
    delay: rest frames after each dance, >= 0.
    n_motions: motions in the library, in [N, 13] (each dancer performs a different one).
    noise_p: cell-flip probability, in [0, 1).
    phase_offset: the most extra rest frames, >= 0.
    prefix: prepended to field names in messages.
  """
  for field, value in (("num_dancers", num_dancers), ("delay", delay), ("n_motions", n_motions),
                       ("phase_offset", phase_offset)):
    if isinstance(value, bool) or int(value) != value:
      raise ValueError(f"{prefix}{field}: must be an integer, got {value!r}")
  if not 1 <= num_dancers <= NUM_SLOTS:
    raise ValueError(f"{prefix}num_dancers: must be in [1, {NUM_SLOTS}], got {num_dancers}")
  if delay < 0:
    raise ValueError(f"{prefix}delay: must be >= 0, got {delay}")
  if not num_dancers <= n_motions <= MAX_MOTIONS:
    raise ValueError(f"{prefix}n_motions: must be in [num_dancers={num_dancers}, {MAX_MOTIONS}], got {n_motions}")
  if not 0.0 <= noise_p < 1.0:
    raise ValueError(f"{prefix}noise_p: must be in [0, 1), got {noise_p}")
  if phase_offset < 0:
    raise ValueError(f"{prefix}phase_offset: must be >= 0, got {phase_offset}")


def make_library(n_motions: int = MAX_MOTIONS, library_seed: int = 0) -> np.ndarray:
  """Draws ``n_motions`` distinct closed walks of 16 moves inside the 3x3 box (spec §11.2's procedure).

  From ``(0, 0)``, move ``s`` picks uniformly (``rng.integers``) among the directions that keep the position in
  the box and within ``15 - s`` (Chebyshev) steps of home, the last move being the one that lands home; a walk
  with no allowed move is dropped, as is a duplicate.

  Args:
    n_motions: walks to draw, in [1, 13].
    library_seed: seed of ``np.random.default_rng``.

  Returns:
    int64 [n_motions, 16] direction indices into :data:`DIRECTIONS`.
  """
  if not 1 <= n_motions <= MAX_MOTIONS:
    raise ValueError(f"n_motions: must be in [1, {MAX_MOTIONS}], got {n_motions}")
  rng = np.random.default_rng(library_seed)
  library: list[list[int]] = []
  while len(library) < n_motions:
    pos, walk = np.zeros(2, np.int64), []
    for s in range(DANCE_LEN):
      remaining = DANCE_LEN - 1 - s
      nxt = pos + DIRECTIONS
      far = np.abs(nxt).max(axis=1)
      allowed = np.flatnonzero((far <= 1) & (far <= remaining))
      if s == DANCE_LEN - 1:
        allowed = allowed[far[allowed] == 0]
      if allowed.size == 0:
        break
      d = int(allowed[rng.integers(allowed.size)])
      walk.append(d)
      pos = pos + DIRECTIONS[d]
    if len(walk) == DANCE_LEN and walk not in library:
      library.append(walk)
  return np.array(library, np.int64)


def library_hash(library: np.ndarray) -> str:
  """sha256 of the library's direction indices as int64 (a golden value pins the generator)."""
  return hashlib.sha256(np.ascontiguousarray(library, np.int64).tobytes()).hexdigest()


def trajectories(library: np.ndarray) -> np.ndarray:
  """Offsets from home after each move: int64 [n_motions, 16, 2] (the last one is (0, 0))."""
  return np.cumsum(DIRECTIONS[library], axis=1)


class Episode(NamedTuple):
  """One episode.

  Attributes:
    inputs: float32 [L, 93] frames; the last one is the query.
    label: the slot (0..7) whose dancer performed the queried motion.
    slots: int [N] the dancers' slots, in dance order.
    motions: int [N] their motions (library indices).
    target: index (0..N-1) of the queried dance.
    phase: rest frames put before the first dance (0 unless ``phase_offset``).
  """
  inputs: np.ndarray
  label: int
  slots: np.ndarray
  motions: np.ndarray
  target: int
  phase: int


def render(offsets: np.ndarray, present: np.ndarray) -> np.ndarray:
  """Board features of frames.

  Args:
    offsets: int [..., 8, 2] each slot's (row, col) offset from home, in [-1, 1].
    present: bool [8] slots that hold a dancer.

  Returns:
    float32 [..., 80]: per slot a one-hot of its cell, or the absent flag.
  """
  cell = (offsets[..., 0] + 1) * 3 + (offsets[..., 1] + 1)                   # [..., 8]
  cell = np.where(present, cell, SLOT_DIMS - 1)
  out = np.zeros(cell.shape + (SLOT_DIMS,), np.float32)
  np.put_along_axis(out, cell[..., None], 1.0, axis=-1)
  return out.reshape(cell.shape[:-1] + (BOARD_DIMS,))


def episode(rng: np.random.Generator, library: np.ndarray, num_dancers: int, delay: int, *, noise_p: float = 0.0,
            phase_offset: int = 0, traj: np.ndarray | None = None) -> Episode:
  """Draws one episode (spec §11.2, ``Episode(rng, N, delay)``).

  Draws, in this order: ``slots = permutation(8)[:N]``, ``motions = permutation(n_motions)[:N]``,
  ``target = integers(N)``, then (only when ``phase_offset > 0``) ``r = integers(phase_offset + 1)``, then (only
  when ``noise_p > 0``) the flips.

  Args:
    rng: the generator.
    library: [n_motions, 16] from :func:`make_library`.
    num_dancers: N.
    delay: rest frames after each dance.
    noise_p: cell-flip probability on watch frames.
    phase_offset: most extra rest frames (see the module docstring).
    traj: :func:`trajectories` of ``library`` (computed when None; pass it to save time in loops).

  Returns:
    The :class:`Episode`.
  """
  n_motions = library.shape[0]
  check_args(num_dancers, delay, n_motions, noise_p, phase_offset)
  traj = trajectories(library) if traj is None else traj
  slots = rng.permutation(NUM_SLOTS)[:num_dancers]
  motions = rng.permutation(n_motions)[:num_dancers]
  target = int(rng.integers(num_dancers))
  phase = int(rng.integers(phase_offset + 1)) if phase_offset else 0
  length = seq_len(num_dancers, delay, phase_offset)
  offsets = np.zeros((length - 1, NUM_SLOTS, 2), np.int64)
  period = DANCE_LEN + delay
  for i, (slot, motion) in enumerate(zip(slots, motions)):
    start = phase + i * period
    offsets[start:start + DANCE_LEN, slot] = traj[motion]
  present = np.zeros(NUM_SLOTS, bool)
  present[slots] = True
  board = render(offsets, present)
  if noise_p:
    cells = np.ones(SLOT_DIMS, bool)
    cells[-1] = False
    flip = (rng.random(board.shape) < noise_p) & np.tile(cells, NUM_SLOTS)
    board = np.where(flip, 1.0 - board, board).astype(np.float32)
  inputs = np.zeros((length, NUM_FEATURES), np.float32)
  inputs[:-1, :BOARD_DIMS] = board
  inputs[-1, BOARD_DIMS + motions[target]] = 1.0
  return Episode(inputs, int(slots[target]), slots, motions, target, phase)


def to_record(ep: Episode) -> dict[str, np.ndarray]:
  """The training record of an episode: ``inputs`` float32 [L, 93], ``targets`` int32 [L] (-100 but the query:
  the label), and the scalars ``dance_index`` (the queried dance, 0..N-1) and ``phase``."""
  targets = np.full(ep.inputs.shape[0], IGNORE, np.int32)
  targets[-1] = ep.label
  return {"inputs": ep.inputs, "targets": targets, "dance_index": np.int32(ep.target),
          "phase": np.int32(ep.phase)}


def generate(num_examples: int, *, num_dancers: int, delay: int, seed: int, n_motions: int = MAX_MOTIONS,
             library_seed: int = 0, noise_p: float = 0.0, phase_offset: int = 0):
  """Yields ``num_examples`` records (:func:`to_record`) from ``np.random.default_rng(seed)``.

  Args:
    num_examples: how many.
    num_dancers: N.
    delay: rest frames after each dance.
    seed: the episode seed (train uses ``seed``, test ``2^31 + seed``).
    n_motions: library size.
    library_seed: the library's seed (shared by all splits).
    noise_p: cell-flip probability on watch frames.
    phase_offset: most extra rest frames.

  Yields:
    Record dicts.
  """
  check_args(num_dancers, delay, n_motions, noise_p, phase_offset)
  library = make_library(n_motions, library_seed)
  traj = trajectories(library)
  rng = np.random.default_rng(seed)
  for _ in range(num_examples):
    yield to_record(episode(rng, library, num_dancers, delay, noise_p=noise_p, phase_offset=phase_offset,
                            traj=traj))
