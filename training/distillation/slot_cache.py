"""A KV cache for decoding rows of different lengths together, allocated once per batch.

`model.generate` on a left-padded batch concatenates every layer's keys and values at every step and puts
each row's prompt after its padding. The teacher's decode loop (`teacher.BatchedGenerator`) uses a
`SlotCache` instead: each row owns a slot of fixed capacity, keeps its tokens in columns 0, 1, ... of it,
as it would alone, and each step writes one new column per row in place. Kept apart from `teacher.py`
so that importing the teacher's configuration does not import transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer


class SlotLayer(DynamicLayer):
    """One decoder layer's keys and values for a batch of rows, in tensors allocated once per batch.

    Each row owns a slot (its index in the batch) and keeps its tokens in columns 0, 1, ... of that slot,
    with no padding before its prompt, so its keys sit at the columns they have when the row is decoded
    alone. `update` writes each row's new key and value at that row's own next column, in place, and
    returns views of the columns in use: nothing is concatenated or reallocated from step to step.
    """

    def __init__(self, slots: SlotCache):
        super().__init__()
        self.slots = slots
        self.key_store: torch.Tensor | None = None
        self.value_store: torch.Tensor | None = None

    def allocate(self, rows: int, capacity: int, like: torch.Tensor) -> None:
        """Room for `rows` rows of `capacity` tokens, shaped and typed like a prefill's keys `like`."""
        _, heads, _, head_dim = like.shape
        self.key_store = like.new_zeros((rows, heads, capacity, head_dim))
        self.value_store = like.new_zeros((rows, heads, capacity, head_dim))
        self.is_initialized = True

    def load(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put one row's prefill keys and values, (1, heads, tokens, head_dim), at the start of its slot."""
        self.key_store[slot, :, : keys.shape[2]] = keys[0]
        self.value_store[slot, :, : values.shape[2]] = values[0]

    def keep(self, slots: torch.Tensor) -> None:
        """Drop every slot but `slots` (a copy: done only when enough rows have finished to pay for it)."""
        self.key_store = self.key_store.index_select(0, slots)
        self.value_store = self.value_store.index_select(0, slots)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        slots, columns = self.slots.slot_index, self.slots.positions
        self.key_store[slots, :, columns] = key_states[:, :, 0]
        self.value_store[slots, :, columns] = value_states[:, :, 0]
        width = self.slots.width
        self.keys, self.values = self.key_store[:, :, :width], self.value_store[:, :, :width]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.slots.width - 1  # the longest row's tokens before this step

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.slots.width, 0


class SlotCache(Cache):
    """The cache of a decode step: one new token per row, rows of different lengths.

    `positions[r]` is the column row r writes next (its token count so far). A step attends over the first
    `width` columns, up to the longest row's new token, and the 2D attention mask hides each shorter row's
    columns beyond its own token. The cache reports the longest row's position as the query offset, so
    the causal part of the model's mask hides nothing a row may see.
    """

    def __init__(self, layers: int):
        super().__init__(layers=[SlotLayer(self) for _ in range(layers)])
        self.positions = torch.zeros(0, dtype=torch.long)
        self.slot_index = torch.zeros(0, dtype=torch.long)
        self.width = 0
        """Columns the next step attends over: the longest row's tokens, including the one being decoded."""

    def allocate(self, prefill: Cache, lengths: Sequence[int], capacity: int) -> None:
        """Room for one row per prompt length, `capacity` tokens each, shaped like `prefill`'s layers."""
        device = prefill.layers[0].keys.device
        for layer, filled in zip(self.layers, prefill.layers, strict=True):
            layer.allocate(len(lengths), capacity, filled.keys)
        self.positions = torch.tensor(list(lengths), dtype=torch.long, device=device)
        self.slot_index = torch.arange(len(lengths), device=device)
        self.width = max(lengths) + 1

    def load(self, slot: int, prefill: Cache) -> None:
        """Copy one prompt's prefill cache (batch of one) into its slot."""
        for layer, filled in zip(self.layers, prefill.layers, strict=True):
            layer.load(slot, filled.keys, filled.values)

    def attention_mask(self) -> torch.Tensor:
        """(rows, width): 1 on each row's own columns, up to and including the token being decoded."""
        columns = torch.arange(self.width, device=self.positions.device)
        return (columns[None, :] <= self.positions[:, None]).long()

    def advance(self) -> None:
        """After a step: every row has written one more column."""
        self.positions += 1
        self.width += 1

    def keep(self, slots: Sequence[int]) -> None:
        """Drop every row but those in `slots` (a copy of the whole cache, so worth it only now and then)."""
        index = torch.tensor(list(slots), dtype=torch.long, device=self.positions.device)
        for layer in self.layers:
            layer.keep(index)
        self.positions = self.positions.index_select(0, index)
        self.slot_index = torch.arange(len(slots), device=self.positions.device)
        self.width = int(self.positions.max()) + 1


def slots_fit(cache: Cache) -> bool:
    """Whether a prefill's cache can move into a `SlotCache`: every layer a plain growing full-attention one
    (not a sliding window, linear attention or another model-specific layer)."""
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)
