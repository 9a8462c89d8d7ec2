"""x @ W.T for a block-quantised W and one or a few rows of x, without decoding W to float.

A quantised number is ``scale · q + offset`` with q a small integer and one scale and offset
per group of 16 or 32 numbers (weights/quants.py, ``DotForm``). Then each output is

    y = Σ_groups  scale · (q · x over the group)  +  offset · (sum of x over the group)

For a tile of W's rows, each ``Plane`` of the type turns every byte into a small integer, in
place (a nibble, two bits, the byte itself), and the integers are cast to float32 with the
bytes where they are. x is laid out the same way once per product: ``weights[p]`` is, for each
block b, a (block bytes, groups) matrix holding x's number j (times the run's weight) at the
byte of plane p that holds q_j, in the column of j's group, and zeros at every other byte
(scales, or another plane's). One batched product over the blocks then gives every group's
``q · x`` at once, and the scales and offsets are applied to those sums, not to the numbers.

Why: decoding a tile means multiplying every number by its group's scale, a NumPy pass whose
inner loop is only 16 or 32 numbers long, and unpacking nibbles into their places, both far
slower than a cast of contiguous bytes. Measured here (one core, a 256 × 4096 tile, one row of
x), the product went from 0.6-1.1 to 1.3-2.0 G numbers/s for Q8_0, Q4_0 and Q4_K
(docs/gguf.md). With many rows of x (a prompt) decoding once and one BLAS product is faster, so
this is used for up to ``DOT_ROWS`` rows.

The result is the same sum computed in another order: within float32 rounding of the decoded
product, not equal to its last bit (docs/gguf.md, "Numbers").
"""

from __future__ import annotations

import numpy as np

DOT_ROWS = 1  # rows of x up to which a product takes the dots, not the decoded tile
SKIP_BELOW = 0.75  # a plane reading less than this part of a block reads only its own bytes


class BlockDots:
    """How one block type's tiles are multiplied by x without decoding (its quants.DotForm)."""

    def __init__(self, form, block_size: int, block_bytes: int):
        self.form = form
        self.block_size, self.block_bytes = block_size, block_bytes
        self.groups = block_size // form.group  # per block
        # per plane: the bytes of a block it reads, and (byte positions within those, number
        # positions, weights). A plane reads from its first run's byte to its last run's end;
        # when that is most of the block it reads the whole block, in one contiguous pass.
        self.places = []
        for plane in form.planes:
            first = min(b for b, _, _, _ in plane.runs)
            end = max(b + n for b, _, n, _ in plane.runs)
            if end - first > SKIP_BELOW * block_bytes:
                first, end = 0, block_bytes
            byte_at = np.concatenate([np.arange(b, b + n) for b, _, n, _ in plane.runs]) - first
            number_at = np.concatenate([np.arange(j, j + n) for _, j, n, _ in plane.runs])
            weight = np.concatenate([np.full(n, w, dtype=np.float32) for _, _, n, w in plane.runs])
            self.places.append((slice(first, end), byte_at, number_at, weight))

    def prepare(self, x: np.ndarray) -> tuple[list, np.ndarray]:
        """x (M, columns) float32 laid out for the tiles: per plane (blocks, block bytes, groups·M),
        and x's sums over each group, (M, columns / group)."""
        m, columns = x.shape
        blocks = columns // self.block_size
        x_blocks = x.reshape(m, blocks, self.block_size)
        weights = []
        for read, byte_at, number_at, weight in self.places:
            width = read.stop - read.start
            w = np.zeros((blocks, width, self.groups, m), dtype=np.float32)
            w[:, byte_at, number_at // self.form.group, :] = (x_blocks[:, :, number_at] * weight).transpose(1, 2, 0)
            weights.append(w.reshape(blocks, width, self.groups * m))
        sums = x.reshape(m, -1, self.form.group).sum(axis=-1)
        return weights, sums

    def scales(self, stored: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(rows, blocks, block bytes) -> scale and offset (rows, blocks · groups), or offset None."""
        rows = stored.shape[0]
        scale, offset = self.form.scales(stored.reshape(-1, self.block_bytes))
        return scale.reshape(rows, -1), None if offset is None else offset.reshape(rows, -1)

    def multiply(self, stored: np.ndarray, prepared: tuple, integers: np.ndarray, numbers: np.ndarray,
                 scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
        """(rows, blocks, block bytes) tile times x -> (rows, M).

        ``integers`` (uint8) and ``numbers`` (float32) are buffers of at least the tile's bytes;
        ``scale`` and ``offset`` are this tile's (``scales``)."""
        weights, sums = prepared
        rows, blocks, _ = stored.shape
        m = sums.shape[0]
        dots = np.zeros((blocks, rows, self.groups * m), dtype=np.float32)
        for plane, (read, *_), w in zip(self.form.planes, self.places, weights):
            raw = stored[..., read]  # (rows, blocks, bytes read)
            size = raw.size
            floats = numbers[:size].reshape(raw.shape)
            if plane.take is None:
                np.copyto(floats, raw.view(np.int8))
            else:
                np.copyto(floats, plane.take(raw, integers[:size].reshape(raw.shape)))
            dots += np.matmul(floats.transpose(1, 0, 2), w)  # (blocks, rows, groups · M)
        dots = dots.reshape(blocks, rows, self.groups, m).transpose(1, 0, 2, 3).reshape(rows, -1, m)
        y = np.einsum("rgm,rg->rm", dots, scale)
        if offset is not None:
            y += offset @ sums.T
        return y
