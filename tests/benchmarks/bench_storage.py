"""The two measurements behind the choices of llama_np/weights/streaming.py (docs/checkpoints.md).

    OPENBLAS_CORETYPE=Haswell python tests/benchmarks/bench_storage.py [--model DIR] [--layer N]

1. Tile size: the seven matrices of one decoder layer, streamed (``streaming.StreamedMatrix``)
   and multiplied by x of 1, 8 and 128 rows, for several values of ``workers.TILE_ELEMENTS``;
   prints milliseconds for the layer and weights per second. ``--model`` takes a float16 or
   bfloat16 checkpoint directory (read from the page cache, as a model uses it); without it,
   random float16 matrices of a Llama-2-7B layer are made in memory (400 MB).
2. BLAS threads for kept weights: ``x @ W.T`` with a float32 W of the bundled model's, TinyLlama's
   and Llama 2 7B's shapes, on one BLAS thread and on two (threadpoolctl, ``pip install
   "llama-np[fast]"``).

Needs only llama_np and threadpoolctl. Not a test: the numbers depend on the machine.
"""

import argparse
import time

import numpy as np
from threadpoolctl import ThreadpoolController

from llama_np.weights import streaming, workers
from llama_np.formats.safetensors import Checkpoint

LLAMA2_7B_LAYER = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
                   "o_proj": (4096, 4096), "gate_proj": (11008, 4096), "up_proj": (11008, 4096),
                   "down_proj": (4096, 11008)}
KEPT_SHAPES = [(288, 288), (768, 288), (2048, 2048), (4096, 4096), (11008, 4096), (32000, 4096)]


def best_seconds(run, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def layer_matrices(model, layer: int) -> list:
    if model is None:
        rng = np.random.default_rng(0)
        return [streaming.StreamedMatrix((rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16),
                                       "F16", name) for name, shape in LLAMA2_7B_LAYER.items()]
    checkpoint = Checkpoint.open(model)
    prefix = f"model.layers.{layer}."
    names = [n for n in checkpoint if n.startswith(prefix) and len(checkpoint[n].shape) == 2]
    matrices = []
    for name in names:
        tensor = checkpoint[name]
        if tensor.dtype not in ("F16", "BF16"):
            raise SystemExit(f"{name} is {tensor.dtype}: only float16/bfloat16 matrices are streamed")
        matrices.append(streaming.StreamedMatrix(tensor.stored(), tensor.dtype, name))
    return matrices


def tile_sizes(matrices: list, tiles_k: list[int]) -> None:
    weights = sum(m.size for m in matrices)
    rng = np.random.default_rng(1)
    inputs = {rows: [rng.standard_normal((rows, m.shape[1]), dtype=np.float32) for m in matrices]
              for rows in (1, 8, 128)}
    default = workers.TILE_ELEMENTS
    print(f"1. one layer's {len(matrices)} streamed matrices ({weights / 1e6:.0f} M weights), "
          f"TILE_ELEMENTS = {default // 1024} K in llama_np")
    try:
        for rows, xs in inputs.items():
            for tile_k in tiles_k:
                workers.TILE_ELEMENTS = tile_k * 1024

                def layer():
                    for m, x in zip(matrices, xs):
                        x @ m.T

                layer()  # the first use checks the rows for inf and NaN
                seconds = best_seconds(layer, 3 if rows < 128 else 1)
                print(f"   x of {rows:3d} rows, tile {tile_k:5d} K elements: {seconds * 1e3:7.1f} ms, "
                      f"{weights / seconds / 1e9:5.2f} G weights/s", flush=True)
    finally:
        workers.TILE_ELEMENTS = default


def kept_threads() -> None:
    controller = ThreadpoolController()
    rng = np.random.default_rng(2)
    print("2. x @ W.T with a kept float32 W: time on 2 BLAS threads / time on 1")
    for shape in KEPT_SHAPES:
        w = rng.standard_normal(shape, dtype=np.float32)
        ratios = []
        for rows in (1, 8):
            x = rng.standard_normal((rows, shape[1]), dtype=np.float32)
            repeats = max(3, int(2e8 // w.size))
            seconds = {}
            for threads in (1, 2):
                with controller.limit(limits=threads, user_api="blas"):
                    x @ w.T
                    seconds[threads] = best_seconds(lambda: [x @ w.T for _ in range(repeats)], 3) / repeats
            ratios.append(f"{rows} row{'s' if rows > 1 else ''}: {seconds[1] * 1e6:8.1f} us on 1, "
                          f"{seconds[2] * 1e6:8.1f} us on 2, ratio {seconds[2] / seconds[1]:.2f}")
        print(f"   W {shape[0]:5d} x {shape[1]:5d}   " + "   ".join(ratios), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a float16/bfloat16 checkpoint directory")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--tiles", default="64,256,1024,4096", help="tile sizes in K elements")
    args = parser.parse_args()
    tile_sizes(layer_matrices(args.model, args.layer), [int(t) for t in args.tiles.split(",")])
    kept_threads()


if __name__ == "__main__":
    main()
