"""x @ W.T for a block-quantised W without decoding W to float32 numbers.

A quantised number is ``scale · q + offset`` with q a small integer and one scale and offset
per group of 16 or 32 numbers (weights/quants.py, ``DotForm``). Then each output is

    y = Σ_groups  scale · (q · x over the group)  +  offset · (sum of x over the group)

For a tile of W's rows, each ``Plane`` of the type turns every byte into a small integer, in
place (a nibble, two bits, the byte itself), and the integers are cast to float32 with the
bytes where they are: nothing is moved into the numbers' order. x is laid out on the same bytes
instead, once per product, with zeros at every byte that holds no q of the plane (a scale, or
another plane's). Two ways on from there:

- ``multiply`` (one row of x, ``DOT_ROWS``: decoding a token): one batched product over the
  blocks gives every group's ``q · x``, and only those sums are scaled — a scale is applied once
  per group, not once per number.
- ``multiply_scaled`` (a few rows, up to ``SCALED_ROWS``: a short prompt): the integers are
  multiplied by their group's scale where they are, and one BLAS product with the laid-out x
  sums everything, as a decoded tile's product would.

Why: decoding a tile means unpacking nibbles into their places and multiplying every number by
its scale in NumPy passes whose inner loops are only 16 or 32 numbers long; both ways here skip
the unpacking, and the first also the per-number scaling. docs/gguf.md has the measurements
(tests/benchmarks/bench_block_dots.py). The results are the same sums in another order: within
float32 rounding of the decoded product, not equal to its last bit.
"""

from __future__ import annotations

import math

import numpy as np

DOT_ROWS = 1  # rows of x up to which a product takes each group's dots (``multiply``)
# ... and up to which it multiplies the scaled integers (``multiply_scaled``). Above, with a long
# prompt, the product is bound by BLAS, and the integers' layout, up to twice as wide as the
# numbers (Q6_K), costs more than decoding the tile once for all the rows.
SCALED_ROWS = 16
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
        # For ``multiply_scaled``: the bytes a plane uses are consecutive chunks of ``chunk``
        # bytes whose numbers share a group: which group, per chunk.
        self.chunks = []
        for plane, (_, byte_at, number_at, _) in zip(form.planes, self.places):
            order = np.argsort(byte_at)
            used, groups = byte_at[order], number_at[order] // form.group
            chunk = math.gcd(form.group, *(n for _, _, n, _ in plane.runs))
            assert np.array_equal(used, np.arange(used[0], used[0] + len(used))), "a plane's bytes have gaps"
            chunk_groups = groups[::chunk]
            assert np.array_equal(groups, np.repeat(chunk_groups, chunk)), "a chunk spans two groups"
            self.chunks.append((slice(int(used[0]), int(used[-1]) + 1), chunk, chunk_groups))

    def x_on_bytes(self, x: np.ndarray) -> list:
        """x (M, columns) float32 laid out on each plane's bytes: per plane (blocks, bytes read,
        groups, M), x's number j (times its run's weight) at the byte holding q_j, in the column
        of j's group, zeros elsewhere."""
        m, columns = x.shape
        blocks = columns // self.block_size
        x_blocks = x.reshape(m, blocks, self.block_size)
        layouts = []
        for read, byte_at, number_at, weight in self.places:
            w = np.zeros((blocks, read.stop - read.start, self.groups, m), dtype=np.float32)
            w[:, byte_at, number_at // self.form.group, :] = (x_blocks[:, :, number_at] * weight).transpose(1, 2, 0)
            layouts.append(w)
        return layouts

    def group_sums(self, x: np.ndarray) -> np.ndarray:
        """x's sums over each group, (M, columns / group): what the offsets multiply."""
        return x.reshape(x.shape[0], -1, self.form.group).sum(axis=-1)

    def prepare(self, x: np.ndarray) -> tuple[list, np.ndarray]:
        """x laid out for ``multiply``: per plane (blocks, bytes read, groups·M); and its group sums."""
        weights = [w.reshape(w.shape[0], w.shape[1], -1) for w in self.x_on_bytes(x)]
        return weights, self.group_sums(x)

    def prepare_scaled(self, x: np.ndarray) -> tuple[list, np.ndarray]:
        """x laid out for ``multiply_scaled``: per plane (blocks · bytes read, M), the groups
        summed away (a byte's number is in one group, so this adds only zeros); and its group sums."""
        layouts = [w.sum(axis=2).reshape(-1, w.shape[3]) for w in self.x_on_bytes(x)]
        return layouts, self.group_sums(x)

    def scales(self, stored: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(rows, blocks, block bytes) -> scale and offset (rows, blocks · groups), or offset None."""
        rows = stored.shape[0]
        scale, offset = self.form.scales(stored.reshape(-1, self.block_bytes))
        return scale.reshape(rows, -1), None if offset is None else offset.reshape(rows, -1)

    @staticmethod
    def plane_numbers(plane, raw: np.ndarray, integers: np.ndarray, numbers: np.ndarray) -> np.ndarray:
        """A plane's integers of ``raw`` (rows, blocks, bytes read) as float32, in the buffer
        ``numbers`` (through ``integers``, uint8), each at its byte's place."""
        floats = numbers[:raw.size].reshape(raw.shape)
        if plane.take is None:  # the bytes themselves, as int8 (Q8_0)
            np.copyto(floats, raw.view(np.int8))
        else:
            np.copyto(floats, plane.take(raw, integers[:raw.size].reshape(raw.shape)))
        return floats

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
            floats = self.plane_numbers(plane, stored[..., read], integers, numbers)
            dots += np.matmul(floats.transpose(1, 0, 2), w)  # (blocks, rows, groups · M)
        dots = dots.reshape(blocks, rows, self.groups, m).transpose(1, 0, 2, 3).reshape(rows, -1, m)
        y = np.einsum("rgm,rg->rm", dots, scale)
        if offset is not None:
            y += offset @ sums.T
        return y

    def multiply_scaled(self, stored: np.ndarray, prepared: tuple, integers: np.ndarray, numbers: np.ndarray,
                        scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
        """(rows, blocks, block bytes) tile times many rows of x -> (rows, M).

        Each plane's integers, cast where their bytes are, are multiplied by their group's scale
        (``scale · q``, the decoded number less its offset) and then by x laid out on the same
        bytes (``prepare_scaled``) in one BLAS product; the offsets go in through x's group sums."""
        layouts, sums = prepared
        rows, blocks, _ = stored.shape
        scale = scale.reshape(rows, blocks, self.groups)
        y = np.zeros((rows, sums.shape[0]), dtype=np.float32)
        for plane, (read, *_), (used, chunk, chunk_groups), x_layout in zip(
                self.form.planes, self.places, self.chunks, layouts):
            floats = self.plane_numbers(plane, stored[..., read], integers, numbers)
            q = floats[..., used].reshape(rows, blocks, -1, chunk)
            np.multiply(q, scale[:, :, chunk_groups, None], out=q)
            y += floats.reshape(rows, -1) @ x_layout
        if offset is not None:
            y += offset @ sums.T
        return y
