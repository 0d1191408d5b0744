"""The layer protocol every memarch sequence mixer follows.

A *sequence mixer* (attention, Titans memory, HCAM, B'MOJO, ...) is a linen module with::

    y, new_state = mixer(x, segment_ids=None, state=None)     # x: [b, t, d] -> y: [b, t, d]
    state = mixer.init_state(batch_size)                      # a typed NamedTuple, float32 by default
    n = mixer.state_size()                                    # floats of recurrent state per sequence

Rules:

  * **One call = the chunked / parallel form**, from ``state`` (``None`` means ``init_state``) to the state after
    the last token. The returned state seeds the next call, so prefill hands over to decoding.
  * **``t == 1`` is the step (decode) form.** Full forward == chunk-by-chunk with carried state == token-by-token:
    this is every mixer's core test.
  * **``segment_ids``** ([b, t] int) mark packed documents: tokens never see another document, and recurrent
    state resets at a document start.
  * **State is explicit**: a NamedTuple (or pytree of them) of batch-leading arrays, float32 unless the caller asks
    otherwise, passed in and out; never a hidden mutable collection. ``init_state`` reads only the module's fields,
    so it can be called on an unbound module.
  * ``state_size()`` counts the floats of state per sequence that grow with the memory (KV cache slots, fast
    weights, SSM states), not bookkeeping integers: it is the x-axis of MQAR accuracy-vs-state plots.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from memarch.typing import Activations, Array, SegmentIds


@runtime_checkable
class SequenceMixer(Protocol):
  """Structural type of a memarch sequence mixer (see the module docstring for the contract)."""

  def __call__(self, x: Activations, *, segment_ids: SegmentIds | None = None,
               state: Any | None = None) -> tuple[Array, Any]:
    """Mixes ``x`` along time from ``state``; returns the output and the state after the last token."""
    ...

  def init_state(self, batch_size: int) -> Any:
    """The state before the first token, for ``batch_size`` sequences."""
    ...

  def state_size(self) -> int:
    """Floats of recurrent state per sequence."""
    ...
