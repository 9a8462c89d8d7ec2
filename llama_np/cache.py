"""The key/value cache: what a decoder layer remembers of every earlier position.

During generation each step runs the model on the newest token only; the keys and values of the
earlier positions are read from here, so a step costs O(S) instead of O(S²). Keys are stored
*after* RoPE, so they are never rotated again, which is why cached and uncached decoding give
the same logits.
"""

from __future__ import annotations

import numpy as np


class KVCache:
    """Keys and values of every past position, per layer: (B, KV, S, hd) each.

    Storage grows by doubling, so appending one token is O(1) amortised rather than a copy of
    the whole history at every step.
    """

    def __init__(self, num_layers: int):
        self.keys: list[np.ndarray | None] = [None] * num_layers
        self.values: list[np.ndarray | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    def get_seq_length(self, layer_index: int = 0) -> int:
        """How many positions the cache holds (S before this call)."""
        return self.lengths[layer_index]

    def update(self, layer_index: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append k, v (B, KV, T, hd) to layer ``layer_index``; return all (B, KV, S, hd)."""
        start, new = self.lengths[layer_index], k.shape[2]
        stored_k = self.keys[layer_index]
        if stored_k is None or start + new > stored_k.shape[2]:
            capacity = max(2 * (start + new), 16)
            grown_k = np.empty(k.shape[:2] + (capacity, k.shape[3]), dtype=k.dtype)
            grown_v = np.empty(v.shape[:2] + (capacity, v.shape[3]), dtype=v.dtype)
            if stored_k is not None:
                grown_k[:, :, :start] = stored_k[:, :, :start]
                grown_v[:, :, :start] = self.values[layer_index][:, :, :start]
            self.keys[layer_index], self.values[layer_index] = grown_k, grown_v
        self.keys[layer_index][:, :, start:start + new] = k
        self.values[layer_index][:, :, start:start + new] = v
        self.lengths[layer_index] = start + new
        end = start + new
        return self.keys[layer_index][:, :, :end], self.values[layer_index][:, :, :end]

    def __len__(self):
        return len(self.keys)
