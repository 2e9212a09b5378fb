"""A KV cache for continuous batching: rows join and leave between decode steps.

Rows are left-padded to a common length, so one forward pass decodes every running request; the 2-D attention mask
hides the padding and each row keeps its own position ids. Buffers are preallocated with headroom and written in
place, so a decode step appends one column instead of copying the whole cache (transformers' DynamicLayer
concatenates on every step, which costs a full cache copy per token).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

_HEADROOM = 128


class _BufferedLayer(DynamicLayer):
    """One layer's keys and values: `buf[:, :, :length]` is live, the rest is headroom for the next steps."""

    def __init__(self) -> None:
        super().__init__()
        self._buf_k: torch.Tensor | None = None
        self._buf_v: torch.Tensor | None = None
        self._length = 0

    def load(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the contents with copies of `keys`/`values` ([batch, heads, length, head_dim])."""
        batch, heads, length, dim = keys.shape
        capacity = length + _HEADROOM
        self._buf_k = keys.new_empty((batch, heads, capacity, dim))
        self._buf_v = values.new_empty((batch, heads, capacity, dim))
        self._buf_k[:, :, :length].copy_(keys)
        self._buf_v[:, :, :length].copy_(values)
        self._length = length
        self._publish()

    def _publish(self) -> None:
        assert self._buf_k is not None and self._buf_v is not None
        self.keys = self._buf_k[:, :, : self._length]
        self.values = self._buf_v[:, :, : self._length]
        self.is_initialized = True
        self.device = self._buf_k.device

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        new = key_states.shape[-2]
        if self._buf_k is None:
            self.load(key_states, value_states)
            return self.keys, self.values
        assert self._buf_v is not None
        if self._length + new > self._buf_k.shape[-2]:
            self.load(self.keys, self.values)  # regrows with fresh headroom
            assert self._buf_k is not None and self._buf_v is not None
        self._buf_k[:, :, self._length : self._length + new].copy_(key_states)
        self._buf_v[:, :, self._length : self._length + new].copy_(value_states)
        self._length += new
        self._publish()
        return self.keys, self.values


class BatchKVCache(Cache):
    """The running batch's cache; the engine reshapes it between steps with `select`, `merge` and `trim_left`."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[_BufferedLayer() for _ in range(num_layers)])

    @property
    def length(self) -> int:
        return self.get_seq_length()

    def _views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.layers]

    def keep(self, rows: Sequence[int], first_column: int = 0) -> None:
        """Keep only `rows`, in that order, from `first_column` on (earlier columns are padding no kept row
        attends to). One copy of what stays, however many rows left."""
        index = torch.tensor(rows, dtype=torch.long, device=self.layers[0].keys.device)
        for layer, (k, v) in zip(self.layers, self._views()):
            layer.load(
                k[:, :, first_column:].index_select(0, index), v[:, :, first_column:].index_select(0, index)
            )

    def merge(self, other: BatchKVCache) -> None:
        """Append `other`'s rows below ours, left-padding whichever is shorter to the common length."""
        length = max(self.length, other.length)
        for layer, (k, v), (ok, ov) in zip(self.layers, self._views(), other._views()):
            layer.load(_cat_left_padded(k, ok, length), _cat_left_padded(v, ov, length))


def _cat_left_padded(a: torch.Tensor, b: torch.Tensor, length: int) -> torch.Tensor:
    batch = a.shape[0] + b.shape[0]
    out = a.new_zeros((batch, a.shape[1], length, a.shape[3]))
    out[: a.shape[0], :, length - a.shape[2] :] = a
    out[a.shape[0] :, :, length - b.shape[2] :] = b
    return out
