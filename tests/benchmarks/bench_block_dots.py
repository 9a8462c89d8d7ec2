"""A streamed matrix times one row of x, per storage type: decoded tile by tile, or by its dots.

    env -u OPENBLAS_L2_SIZE OPENBLAS_CORETYPE=Haswell python tests/benchmarks/bench_block_dots.py

A 4096 × 4096 matrix of N(0, 0.02²) weights in each type (the k-quants, which llama_np does not
write, as random blocks with scales of about 1e-2), multiplied by one float32 row with both
cores; the best of 3 repeats of 5 products, in G numbers of W per second. docs/gguf.md keeps a
table of these figures. Not a test: the numbers depend on the machine.
"""

import timeit

import numpy as np

from llama_np.weights import streaming
from llama_np.weights.codecs import CODECS

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
    x = rng.standard_normal((1, 4096)).astype(np.float32)
    print(f"{'type':6} {'decoded':>8} {'dots':>8}   (G numbers of W per second, one row of x)")
    for name in ("F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"):
        matrix = streaming.StreamedMatrix(stored(name, weights, rng), name, "w")
        x @ matrix.T  # the first product checks the rows for inf and NaN
        dots = per_second(matrix, x) if matrix.codec.dots is not None else None
        rows, streaming.DOT_ROWS = streaming.DOT_ROWS, 0  # decode every tile
        decoded = per_second(matrix, x)
        streaming.DOT_ROWS = rows
        print(f"{name:6} {decoded:8.2f} {'-' if dots is None else f'{dots:.2f}':>8}")


if __name__ == "__main__":
    main()
