"""One training step — forward, backward, AdamW — in llama_np beside torch eager float32.

    OPENBLAS_CORETYPE=Haswell python tests/benchmarks/bench_training.py \\
        [--torch-python /path/to/venv-with-torch/bin/python] [--dir /tmp/llama-np-training] \\
        [--shapes bundled,tinyllama-2l] [--threads 2]

Two models: the bundled tiny-shakespeare (3.8 M parameters, its float16 file widened to float32)
and a TinyLlama-1.1B-shaped model cut to 2 layers (hidden 2048, intermediate 5632, 32 query and 4
key/value heads, vocabulary 32000: 221 M parameters, most of them in the embedding and the head),
with random weights written once under --dir in bfloat16 as TinyLlama ships (never into the
repository). Each implementation runs in a fresh process with the same number of threads, the
same batch of random token ids with labels = input ids, and AdamW (lr 1e-4, weight decay 0.01):

    llama_np     loss, grads = value_and_grad(model, ids, labels=ids); AdamW.step(grads)
    torch        Transformers' LlamaForCausalLM in float32, eager attention, train mode:
                 loss = model(ids, labels=ids).loss; loss.backward(); AdamW.step(); zero_grad()

It prints, per step, the median time of the timed steps (after warm-up steps), split into the
forward + backward and the optimizer step, the peak private (anonymous) memory of the process,
and the first step's loss of each (the same weights and batch, so they should agree), then
llama_np's times as ratios of torch's. Transformers is optional: --torch-python names an
interpreter with torch and transformers (default: this one, if it can import them). Not a
test: the numbers depend on the machine; docs/performance.md keeps a table of them.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench_real_shapes import PeakPrivate, torch_python, write_checkpoint

TINYLLAMA_2_LAYERS = dict(dtype="bfloat16", config=dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
    num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
    rms_norm_eps=1e-5, rope_theta=10000.0))
# (batch, tokens, warm-up steps, timed steps) per shape
RUNS = {"bundled": (4, 128, 2, 10), "tinyllama-2l": (1, 256, 1, 3)}
LEARNING_RATE, WEIGHT_DECAY = 1e-4, 0.01


def batch_ids(batch: int, length: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(3, vocab, size=(batch, length))


def measure_llama_np(path: str, batch: int, length: int, warmup: int, steps: int) -> dict:
    import llama_np
    from llama_np import LlamaForCausalLM
    from llama_np.training.optim import AdamW

    peak = PeakPrivate()
    model = LlamaForCausalLM.from_pretrained(path)  # widened to float32
    optimizer = AdamW(model.named_parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    ids = batch_ids(batch, length, model.config.vocab_size)
    losses, forward_backward, optimizer_step = [], [], []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        loss, grads = llama_np.value_and_grad(model, ids, labels=ids)
        middle = time.perf_counter()
        optimizer.step(grads)
        end = time.perf_counter()
        losses.append(float(loss))
        forward_backward.append(middle - start)
        optimizer_step.append(end - middle)
        del grads
    return summary(losses, forward_backward, optimizer_step, warmup, peak,
                   library=str(Path(llama_np.__file__).parent))


def measure_torch(path: str, batch: int, length: int, warmup: int, steps: int, threads: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(threads)
    peak = PeakPrivate()
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    ids = torch.tensor(batch_ids(batch, length, model.config.vocab_size))
    losses, forward_backward, optimizer_step = [], [], []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        loss = model(ids, labels=ids).loss
        loss.backward()
        middle = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        losses.append(float(loss))
        forward_backward.append(middle - start)
        optimizer_step.append(end - middle)
    return summary(losses, forward_backward, optimizer_step, warmup, peak,
                   library=f"transformers {transformers.__version__}, torch {torch.__version__}")


def summary(losses, forward_backward, optimizer_step, warmup, peak, library) -> dict:
    timed = slice(warmup, None)
    steps = [a + b for a, b in zip(forward_backward, optimizer_step)]
    return {"library": library, "first_loss": losses[0], "last_loss": losses[-1],
            "step": statistics.median(steps[timed]), "forward_backward": statistics.median(forward_backward[timed]),
            "optimizer": statistics.median(optimizer_step[timed]), "first_step": steps[0],
            "peak_private_gb": peak.stop()}


def child(command: list, env) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def model_path(shape: str, directory: Path) -> Path:
    if shape == "bundled":
        from llama_np.formats.locate import resolve_model_path

        return Path(resolve_model_path("tiny-shakespeare"))
    path = directory / shape
    if not (path / "config.json").exists():
        start = time.perf_counter()
        write_checkpoint(path, TINYLLAMA_2_LAYERS)
        print(f"wrote {path} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return path


def seconds(value: float) -> str:
    return f"{value * 1e3:.0f} ms" if value < 1 else f"{value:.2f} s"


def report(results: list, threads: int) -> None:
    head = ["model", "batch × tokens", "implementation", "step", "fwd + bwd", "AdamW", "first step",
            "peak private", "first loss"]
    widths = [13, 14, 30, 8, 9, 8, 10, 12, 10]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    print(f"\none training step, {threads} threads each; step, fwd + bwd and AdamW are medians of the timed steps\n")
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in results:
        if "error" in r:
            print(line([r["shape"], r["size"], r["implementation"], "error: " + r["error"][:80]] + [""] * 5))
            continue
        print(line([r["shape"], r["size"], r["implementation"], seconds(r["step"]), seconds(r["forward_backward"]),
                    seconds(r["optimizer"]), seconds(r["first_step"]), f"{r['peak_private_gb']:.2f} GB",
                    f"{r['first_loss']:.5f}"]))
    print("\nratios, llama_np / torch (time: above 1 is slower; memory: above 1 is more):")
    by = {(r["shape"], r["implementation"].split()[0]): r for r in results if "error" not in r}
    for shape in dict.fromkeys(r["shape"] for r in results):
        ours, theirs = by.get((shape, "llama_np")), by.get((shape, "torch"))
        if ours and theirs:
            print(f"  {shape}: step {ours['step'] / theirs['step']:.2f}x, fwd + bwd "
                  f"{ours['forward_backward'] / theirs['forward_backward']:.2f}x, AdamW "
                  f"{ours['optimizer'] / theirs['optimizer']:.2f}x, peak private memory "
                  f"{ours['peak_private_gb'] / theirs['peak_private_gb']:.2f}x; first losses differ by "
                  f"{abs(ours['first_loss'] - theirs['first_loss']):.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llama-np-training"))
    parser.add_argument("--shapes", default=",".join(RUNS))
    parser.add_argument("--torch-python", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["llama_np", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        batch, length, warmup, steps = RUNS[args.run]
        if args.child == "llama_np":
            print(json.dumps(measure_llama_np(args.path, batch, length, warmup, steps)))
        else:
            print(json.dumps(measure_torch(args.path, batch, length, warmup, steps, args.threads)))
        return

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads))
    torch_py = torch_python(args.torch_python)
    if torch_py is None:
        print("torch rows left out: no torch here. pip install torch==2.13.0 transformers==5.23.0 "
              "(or pass --torch-python)", file=sys.stderr)
    results = []
    for shape in args.shapes.split(","):
        path = model_path(shape, args.dir)
        batch, length, _, _ = RUNS[shape]
        common = ["--path", str(path), "--run", shape, "--threads", str(args.threads)]
        runs = [("llama_np float32", sys.executable, "llama_np")]
        if torch_py is not None:
            runs.append(("torch eager float32", torch_py, "torch"))
        for label, python, which in runs:
            r = child([python, __file__, "--child", which] + common, env)
            results.append(dict(r, shape=shape, size=f"{batch} × {length}", implementation=label))
            print(f"  {shape} {label}: {r}", file=sys.stderr)
    report(results, args.threads)


if __name__ == "__main__":
    main()
