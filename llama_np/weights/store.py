"""The named tensors of a model, widened to the compute dtype when they are used.

Each tensor is kept (widened once) or streamed from the memory map (``streaming.StreamedMatrix``);
``memory.py`` decides how much to keep. docs/checkpoints.md explains the policy.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from llama_np.weights.codecs import CODECS
from llama_np.weights import workers
from llama_np.weights.streaming import StreamedMatrix

# progress(done, total): told as each of ``total`` steps (decoder layers) is about to run
Progress = Callable[[int, int], None]


class Weights:
    """The named tensors of a model, as the compute dtype when they are used.

    Values are memory-mapped checkpoint tensors (``formats.safetensors.StoredTensor``) or arrays. Each
    tensor is used in one of two ways (``llama_np.weights.streaming``, docs/checkpoints.md):

    - kept: widened once, on first use, and kept — every tensor with ``keep_widened=True``;
      with ``keep_widened=False``, the 1-D ones (norms, biases) and the first matrices used
      (the embedding aside) until ``widened_budget`` bytes are spent;
    - streamed: a 2-D float16/bfloat16 tensor left in the memory map as a
      ``streaming.StreamedMatrix``, which ``x @ W.T`` widens tile by tile in cache-sized buffers.

    Any other tensor (a float32 one, say) is used as the memory-mapped view itself when it
    needs no widening, else widened on every use. ``checkpoint`` is the ``Checkpoint`` the
    tensors come from, if any (see ``check_unchanged``). ``progress`` is called as each layer is
    about to run (``llama-np`` passes a terminal bar; None shows nothing).
    """

    def __init__(self, tensors: dict, dtype=np.float32, keep_widened: bool = True, widened_budget: int = 0,
                 checkpoint=None, progress: Progress | None = None):
        self.tensors = dict(tensors)
        self.dtype = np.dtype(dtype)
        self.keep_widened = keep_widened
        self.widened_budget = int(widened_budget)  # bytes of widened tensors kept when not keep_widened
        self.widened_bytes = 0  # of those, kept so far
        self.checkpoint = checkpoint
        self._widened: dict[str, np.ndarray] = {}
        self._streamed: dict[str, StreamedMatrix] = {}
        self.all_widened = False  # with keep_widened: every tensor widened (widen_all)
        self.progress = progress
        # the most elements of any 2-D tensor: what decides the BLAS thread policy (product_threads)
        self.largest_matrix = max((int(np.prod(t.shape)) for t in self.tensors.values() if len(t.shape) == 2),
                                  default=0)

    def check_unchanged(self) -> None:
        """CheckpointError if a checkpoint file changed since it was opened (one stat per file).

        Kept F32 weights are views of the file's memory mapping: reading them after the file
        shrank (a re-download in place, a full disk) would kill the process with SIGBUS, so a
        forward pass asks first.
        """
        if self.checkpoint is not None:
            self.checkpoint.check_unchanged()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str):
        if name in self._widened:
            return self._widened[name]
        if name in self._streamed:
            return self._streamed[name]
        stored = self.tensors[name]
        if isinstance(stored, np.ndarray):
            value = stored.astype(self.dtype, copy=False)
            if self.keep_widened:
                self._widened[name] = value
            return value
        if self._keeps(name, stored):
            value = self._widened[name] = stored.numpy(self.dtype)
            if not self.keep_widened:
                self.widened_bytes += value.nbytes
            return value
        if self._streams(stored):
            source = f"tensor {name!r} in {stored.file}"  # named by a NaN or inf found when used
            matrix = self._streamed[name] = StreamedMatrix(stored.stored(), stored.dtype, name, self.dtype,
                                                                    source)
            return matrix
        return stored.numpy(self.dtype)

    def _keeps(self, name: str, stored) -> bool:
        """Whether this checkpoint tensor is widened once and kept.

        The embedding is left out of the budget: a lookup widens only the rows it reads.
        """
        if self.keep_widened or len(stored.shape) < 2:
            return True
        if name.endswith("embed_tokens.weight"):
            return False
        widened = int(np.prod(stored.shape)) * self.dtype.itemsize
        return self.widened_bytes + widened <= self.widened_budget

    def _streams(self, stored) -> bool:
        """Whether a tensor that is not kept is streamed (else widened on every use)."""
        return len(stored.shape) == 2 and CODECS[stored.dtype].streamed and self.dtype == np.float32

    def get(self, name: str):
        return self[name] if name in self.tensors else None

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        self.tensors[name] = value
        self.all_widened = False
        kept = self._widened.pop(name, None)
        if kept is not None and not self.keep_widened:
            self.widened_bytes -= kept.nbytes
        self._streamed.pop(name, None)
        if len(value.shape) == 2:  # a grown embedding (resize_token_embeddings) may be the largest now
            self.largest_matrix = max(self.largest_matrix, int(np.prod(value.shape)))

    def shape(self, name: str) -> tuple:
        return tuple(self.tensors[name].shape)

    def items(self):
        return ((name, self[name]) for name in self.tensors)

    def widen_all(self, layers: list[list[str]]) -> None:
        """Widen every tensor now, layer by layer (``layers``: each layer's tensor names): keep_widened.

        A kept model widens all of them in its first forward anyway; doing it before the first
        layer's products, rather than tensor by tensor between them, leaves both cores to the
        widening (OpenBLAS's threads keep spinning for a while after a product): see
        docs/checkpoints.md for what it saves a TinyLlama's first forward.
        """
        for index, names in enumerate(layers):
            self.step(index, len(layers))
            for name in names:
                self.get(name)
        for name in self.tensors:  # the embedding, the final norm, the head
            self[name]
        self.all_widened = True

    def product_threads(self):
        """The BLAS thread policy for products with these weights (``workers.blas_threads_for``)."""
        return workers.blas_threads_for(self.largest_matrix)

    def step(self, index: int, count: int) -> None:
        """Tell ``progress`` that step ``index`` of ``count`` is about to run."""
        if self.progress is not None:
            self.progress(index, count)
