"""A KV cache for a batch whose rows come and go, without copying the whole cache at every change.

transformers' DynamicCache grows by `torch.cat` at every step and can only change rows by copying everything; at
batch 32 that is ~1 s per join or leave on this CPU. Here each layer keeps its keys and values in buffers with spare
rows and columns, and the batch sees a window of them, `[:rows, :, start:end]`:
- a decode step writes one column in place;
- a new row is written into a spare row, right-aligned to `end` (its left padding zeroed);
- a leaving row is replaced by the last row (one row copied), so rows stay contiguous;
- columns that are padding in every row are dropped by moving `start` (free).
Buffers are reallocated (window copied once) only when they run out of room: rows grow by a quarter at a time up to
the batch's limit (allocating the limit up front held MAX_BATCH_SIZE rows of memory even while the token budget kept
the batch smaller), columns by a spare margin.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

SPARE_COLUMNS = 64


class SlotLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """One model layer's keys and values for the window `[:rows, :, start:end]` of its buffers."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.key_buffer = keys
        self.value_buffer = values
        self.rows = 0
        self.start = 0
        self.end = 0
        self.is_initialized = True
        self.device = keys.device

    def _refresh(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.key_buffer[: self.rows, :, self.start : self.end]
        values = self.value_buffer[: self.rows, :, self.start : self.end]
        self.keys, self.values = keys, values
        return keys, values

    def set_window(self, rows: int, start: int, end: int) -> None:
        self.rows, self.start, self.end = rows, start, end
        self._refresh()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # the owner made room beforehand (SlotCache.reserve_columns), so this is an in-place write
        width = key_states.shape[-2]
        self.key_buffer[: self.rows, :, self.end : self.end + width] = key_states
        self.value_buffer[: self.rows, :, self.end : self.end + width] = value_states
        self.end += width
        return self._refresh()

    def get_seq_length(self) -> int:
        return self.end - self.start


class SlotCache(Cache):
    """All layers of a running batch; rows are added from a prefilled DynamicCache and removed by index. Keys and
    values are kept in `dtype` (default: the prefilled cache's), converted as rows are added."""

    def __init__(self, template: DynamicCache, max_rows: int, dtype: torch.dtype | None = None) -> None:
        sample = _layer_tensors(template)[0][0]
        rows, heads, _, dim = sample.shape
        self.heads, self.dim, self.dtype, self.device = heads, dim, dtype or sample.dtype, sample.device
        self.max_rows = max(max_rows, rows)
        self.row_capacity = rows
        self.column_capacity = 0
        self.rows = self.start = 0
        layers: list[Any] = [SlotLayer(*self._empty_buffers()) for _ in _layer_tensors(template)]
        super().__init__(layers=layers)

    # ----- geometry -------------------------------------------------------------------------------------------------

    @property
    def end(self) -> int:
        """One past the newest column; the layers advance it themselves as the model writes each step."""
        return self.slot_layers()[0].end

    @property
    def columns(self) -> int:
        return self.end - self.start

    def _empty_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.row_capacity, self.heads, self.column_capacity, self.dim)
        return (
            torch.empty(shape, dtype=self.dtype, device=self.device),
            torch.empty(shape, dtype=self.dtype, device=self.device),
        )

    def slot_layers(self) -> list[SlotLayer]:
        return [layer for layer in self.layers if isinstance(layer, SlotLayer)]

    def _apply_window(self, end: int | None = None) -> None:
        end = self.end if end is None else end
        for layer in self.slot_layers():
            layer.set_window(self.rows, self.start, end)

    def _reallocate(self, rows: int, left_room: int, columns_needed: int) -> None:
        """Move the window into new buffers with `left_room` free columns before it and spare columns after."""
        self.row_capacity = max(self.row_capacity, rows)
        old_start, old_end = self.start, self.end
        self.start = left_room
        end = left_room + (old_end - old_start)
        self.column_capacity = max(end + SPARE_COLUMNS, left_room + columns_needed + SPARE_COLUMNS)
        for layer in self.slot_layers():
            keys, values = self._empty_buffers()
            keys[: self.rows, :, self.start : end] = layer.key_buffer[: self.rows, :, old_start:old_end]
            values[: self.rows, :, self.start : end] = layer.value_buffer[: self.rows, :, old_start:old_end]
            layer.key_buffer, layer.value_buffer = keys, values
        self._apply_window(end)

    def advance(self, width: int) -> None:
        """Count `width` columns the model wrote straight into the buffers, after `end`, as part of the window."""
        self._apply_window(self.end + width)

    def reserve_columns(self, width: int) -> None:
        """Make sure `width` more columns fit after `end` (before a decode step)."""
        if self.end + width > self.column_capacity:
            self._reallocate(self.rows, 0, self.columns + width)

    # ----- rows -------------------------------------------------------------------------------------------------------

    def add_rows(self, prefilled: DynamicCache) -> None:
        """Append the rows of a freshly prefilled cache, right-aligned with the running rows."""
        tensors = _layer_tensors(prefilled)
        new_rows, _, width, _ = tensors[0][0].shape
        rows_needed = self.rows + new_rows
        new_start = min(self.start, self.end - width) if self.rows else self.end - width
        if rows_needed > self.row_capacity or new_start < 0:
            rows = self.row_capacity
            if rows_needed > rows:
                rows = min(self.max_rows, max(rows_needed, rows + max(1, rows // 4)))
            left_room = max(0, width - self.columns)
            self._reallocate(rows, left_room, max(width, self.columns))
            new_start = min(self.start, self.end - width) if self.rows else self.end - width
        for layer, (keys, values) in zip(self.slot_layers(), tensors, strict=True):
            for buffer, new in ((layer.key_buffer, keys), (layer.value_buffer, values)):
                # running rows gain padding columns on the left when the newcomer is wider than the window
                buffer[: self.rows, :, new_start : self.start] = 0
                buffer[self.rows : rows_needed, :, new_start : self.end - width] = 0
                buffer[self.rows : rows_needed, :, self.end - width : self.end] = new
        self.rows, self.start = rows_needed, new_start
        self._apply_window()

    def remove_rows(self, leaving: list[int]) -> list[int]:
        """Drop rows; each hole is filled by the current last row. Returns the old index of each remaining row."""
        order = list(range(self.rows))
        for index in sorted(leaving, reverse=True):
            last = len(order) - 1
            if index != last:
                for layer in self.slot_layers():
                    layer.key_buffer[index, :, self.start : self.end] = layer.key_buffer[last, :, self.start : self.end]
                    layer.value_buffer[index, :, self.start : self.end] = layer.value_buffer[
                        last, :, self.start : self.end
                    ]
                order[index] = order[last]
            order.pop()
        self.rows = len(order)
        self._apply_window()
        return order

    def drop_leading_columns(self, count: int) -> None:
        """Forget `count` columns at the left of the window (padding in every row)."""
        self.start += count
        self._apply_window()


def _layer_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers: list[Any] = list(cache.layers)
    return [(layer.keys, layer.values) for layer in layers]
