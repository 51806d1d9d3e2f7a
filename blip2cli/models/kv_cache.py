"""Key/value caches for the decode loop: the name a decoder takes its cache under, and a cache that writes each step
into a preallocated buffer and can reorder its rows after a shared prefix."""

from __future__ import annotations

import inspect

import torch


def decoder_cache_kwarg(decoder: torch.nn.Module) -> str:
    """The name under which ``decoder`` takes its key/value cache: ``cache`` in current transformers, where the
    older ``past_key_values`` is deprecated (and goes in 5.40), ``past_key_values`` in releases before the rename."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def buffered_cache(capacity: int):
    """A transformers ``DynamicCache`` whose layers write each step into a buffer of ``capacity`` positions rather
    than concatenating new keys and values at every step (copies that grow with the square of the length)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class BufferedLayer(DynamicLayer):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.dtype, self.device, self.length = key_states.dtype, key_states.device, 0
                self.buffers = [x.new_empty((*x.shape[:2], capacity, x.shape[-1])) for x in (key_states, value_states)]
                self.is_initialized = True
            end = self.length + key_states.shape[-2]
            for buffer, x in zip(self.buffers, (key_states, value_states)):
                buffer[:, :, self.length:end] = x
            self.length = end
            self.keys, self.values = (buffer[:, :, :end] for buffer in self.buffers)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                self._narrow([buffer.repeat_interleave(repeats, dim=0) for buffer in self.buffers])

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized:
                self._narrow([buffer[indices] for buffer in self.buffers])

        def reorder_cache(self, beam_idx: torch.Tensor) -> None:
            self.batch_select_indices(beam_idx)

        def reorder_from(self, rows: torch.Tensor, start: int) -> None:
            """Row ``i`` takes row ``rows[i]``'s positions from ``start`` on; the earlier ones are the same in both."""
            if self.is_initialized and start < self.length:
                for buffer in self.buffers:
                    buffer[:, :, start:self.length] = buffer[rows, :, start:self.length]

        def _narrow(self, buffers: list[torch.Tensor]) -> None:
            self.buffers = buffers
            self.keys, self.values = (buffer[:, :, :self.length] for buffer in buffers)

    cache = DynamicCache()
    cache.layer_class_to_replicate = BufferedLayer
    return cache


def reorder_after(cache, rows: torch.Tensor, start: int) -> None:
    """Reorder a :func:`buffered_cache`'s rows (``rows[i]`` to ``i``) where the positions before ``start`` are the
    same in every row that moves (the prompt shared by an image's beams): only the positions after it move."""
    for layer in cache.layers:
        layer.reorder_from(rows, start)
