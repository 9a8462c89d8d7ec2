"""A streamed matrix times x, per storage type: decoded tile by tile, or without decoding.

    env -u OPENBLAS_L2_SIZE OPENBLAS_CORETYPE=Haswell python tests/benchmarks/bench_block_dots.py

A 4096 × 4096 matrix of N(0, 0.02²) weights in each type (the k-quants, which llama_np does not
write, as random blocks with scales of about 1e-2), multiplied by 1, 8, 16 and 128 float32 rows of x
with both cores, each way: decoding every tile, and (for the types with a ``DotForm``) the way
a product takes without decoding — each group's dots for one row, the integers times their
scales in one BLAS product for more. The best of 3 repeats of 5 products, in G numbers of W per
second (for 128 rows, G multiply-adds per second / 128 would be the rate of rows). docs/gguf.md
keeps a table of these figures. Not a test: the numbers depend on the machine.
"""

import timeit

import numpy as np

from llama_np.weights import streaming
from llama_np.weights.block_dots import SCALED_ROWS
from llama_np.weights.codecs import CODECS

ROWS = (1, 8, 16, 128)
SCALE_OFFSETS = {"Q4_K": [0, 2], "Q6_K": [208]}


def stored(name: str, weights: np.ndarray, rng) -> np.ndarray:
    codec = CODECS[name]
    if name == "F16":
        return weights.astype(np.float16)
    if codec.encode_blocks is not None:
        return codec.encode(weights)
    rows, columns = weights.shape
    raw = rng.integers(0, 256, (rows, columns // codec.block_size, codec.block_bytes), dtype=np.uint8)
    for offset in SCALE_OFFSETS[name]:
        scales = rng.uniform(1e-3, 1e-2, size=raw.shape[:2]).astype(np.float16)
        raw[..., offset:offset + 2] = scales.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw


def per_second(matrix, x) -> float:
    seconds = min(timeit.repeat(lambda: x @ matrix.T, number=5, repeat=3)) / 5
    return matrix.size / seconds / 1e9


def main():
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((4096, 4096)) * 0.02).astype(np.float32)
    print("G numbers of W per second, decoded tile by tile / without decoding, for 1, 8, 16, 128 rows of x")
    print(f"{'type':6} " + " ".join(f"{f'{m} rows':>15}" for m in ROWS))
    for name in ("F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"):
        matrix = streaming.StreamedMatrix(stored(name, weights, rng), name, "w")
        cells = []
        for m in ROWS:
            x = rng.standard_normal((m, 4096)).astype(np.float32)
            x @ matrix.T  # the first product checks the rows for inf and NaN
            dots, matrix.codec.dots = matrix.codec.dots, None  # decode every tile
            decoded = per_second(matrix, x)
            matrix.codec.dots = dots
            without = dots is not None and m <= SCALED_ROWS  # more rows: the product decodes
            cells.append(f"{decoded:.2f}" + (f" / {per_second(matrix, x):.2f}" if without else ""))
        print(f"{name:6} " + " ".join(f"{cell:>15}" for cell in cells))


if __name__ == "__main__":
    main()
