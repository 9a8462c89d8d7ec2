"""How long a 7B-shaped float16 checkpoint takes to open, and the memory it needs.

    python tests/benchmarks/bench_load_7b.py [--dir /tmp/llama-7b-random] [--forward]

Writes (once) a checkpoint with Llama 2 7B's shapes and random float16 weights in two shards,
as the hub checkpoints are laid out, then measures in a fresh process:
- ``from_pretrained``: wall time and resident memory (only headers are read: memory-mapped);
- with ``--forward``: one forward pass over 8 tokens with weights widened per layer on use,
  its time and the peak resident memory.
Not a test: timings belong in benchmarks, never in unit tests.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, torch_dtype="float16", architectures=["LlamaForCausalLM"])


def resident_mib(field: str = "VmRSS") -> float:
    """A /proc/self/status memory field in MiB: VmRSS (all), RssAnon (private), RssFile (mapped files)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_checkpoint(directory: Path) -> None:
    from llama_np import LlamaConfig, LlamaForCausalLM
    from llama_np.formats.safetensors import save_safetensors

    config = LlamaConfig.from_dict(LLAMA2_7B)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = LlamaForCausalLM.expected_shapes(config)
    names = list(shapes)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for index, part in enumerate(halves, start=1):
        file_name = f"model-{index:05d}-of-00002.safetensors"
        tensors = {}
        for name in part:
            shape = shapes[name]
            tensors[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
            weight_map[name] = file_name
        save_safetensors(directory / file_name, tensors, metadata={"format": "pt"})
        del tensors
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(directory)


def measure(directory: Path, forward: bool) -> dict:
    from llama_np import LlamaForCausalLM

    before = resident_mib()
    start = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(directory)
    result = {"open_seconds": time.perf_counter() - start,
              "open_resident_mib": resident_mib() - before,
              "checkpoint_gib": model.checkpoint.nbytes / 1024**3,
              "keep_widened": model.weights.keep_widened}
    if forward:
        start = time.perf_counter()
        logits = model(np.array([[1, 450, 4996, 17354, 1701, 432, 17204, 975]])).logits
        # Mapped checkpoint pages count as resident once touched, but they are clean file pages
        # the kernel can drop at any time; the private (anonymous) memory is what must fit.
        result.update(forward_seconds=time.perf_counter() - start, peak_resident_mib=peak_mib(),
                      after_forward_private_mib=resident_mib("RssAnon"),
                      after_forward_mapped_file_mib=resident_mib("RssFile"),
                      logits_finite=bool(np.isfinite(logits).all()))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llama-7b-random"))
    parser.add_argument("--forward", action="store_true")
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_only:
        print(json.dumps(measure(args.dir, args.forward)))
        return
    if not (args.dir / "model.safetensors.index.json").exists():
        start = time.perf_counter()
        write_checkpoint(args.dir)
        print(f"wrote {args.dir} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    # a fresh process, so that nothing of the writing is resident or cached in Python
    command = [sys.executable, __file__, "--dir", str(args.dir), "--measure-only"]
    if args.forward:
        command.append("--forward")
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    for key, value in result.items():
        print(f"{key:>20}: {value:.2f}" if isinstance(value, float) else f"{key:>20}: {value}")


if __name__ == "__main__":
    main()
