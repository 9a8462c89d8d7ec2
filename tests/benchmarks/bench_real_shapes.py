"""llama_np beside Transformers on checkpoints of real sizes, with the machine's own limits.

    OPENBLAS_CORETYPE=Haswell python tests/benchmarks/bench_real_shapes.py \\
        [--torch-python /path/to/venv-with-torch/bin/python] [--dir /tmp/llama-np-shapes] \\
        [--shapes tinyllama,llama2-7b,llama2-70b-2l] [--model llama2-7b=/models/Llama-2-7b-hf] \\
        [--gguf F16,Q8_0,Q4_0,Q4_K_M --llama-cpp /path/to/llama.cpp/build/bin]

Writes (once, under --dir) random-weight checkpoints with the shapes of TinyLlama-1.1B
(bfloat16), Llama-2-7B (float16) and a 2-layer Llama-2-70B (float16: GQA with 8 key/value
heads, hidden 8192, intermediate 28672), unless --model gives a directory for a shape. Then,
each in a fresh process after the checkpoint's files have been read once (so they are in the
page cache, from which the other shapes' files are evicted first), for llama_np and for Transformers in float32 and in the checkpoint's own dtype:
load time, first and warm forward over 8 and 128 tokens, greedy decoding in new tokens per
second (the cached steps after the prompt), and the peak private (anonymous) memory. In the
same run it measures the machine's limits — float32 GEMM GFLOP/s and memory read bandwidth —
and prints each llama_np figure as a fraction of the limit it could reach.

With --gguf TYPES (say F16,Q8_0,Q4_0,Q4_K_M), each shape is also written as GGUF files of those
types (``llama-np quantize``; the k-quant mixes by llama.cpp's ``llama-quantize`` from the F16
file) and run by llama_np with its matrices streamed quantised (keep_widened=False) and, when
--llama-cpp names a build directory holding ``llama-bench`` (or it is on PATH), by llama.cpp's
``llama-bench`` on the same files and threads: forward over 8 and 128 tokens (its pp8, pp128),
greedy decoding (tg), and the peak private memory of its process. The checkpoints get a made-up
vocabulary of the shape's size so that llama.cpp loads them; the prompts are random ids.

Transformers is optional: its rows are measured by --torch-python (default: this interpreter
if it can import torch). Install it with
    pip install torch==2.13.0 transformers==5.23.0
(pin torch: an unpinned one pulls a multi-GB CUDA build). A configuration whose float32 weights
do not fit in the available memory is reported as such and not run. Not a test: the numbers
depend on the machine; docs/performance.md keeps a table of them.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SHAPES = {
    "tinyllama": dict(dtype="bfloat16", new_tokens=32, repeats=3, config=dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=10000.0)),
    "llama2-7b": dict(dtype="float16", new_tokens=6, repeats=1, config=dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0)),
    "llama2-70b-2l": dict(dtype="float16", new_tokens=6, repeats=1, also_streamed=True, config=dict(
        vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=2,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0)),
}
STORAGE = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
SHARD_BYTES = 2 * 1024**3
LENGTHS = (8, 128)


# ---------------------------------------------------------------------------- memory


def status_kib(field: str, pid="self") -> int:
    """A /proc/<pid>/status field in KiB: RssAnon is the private (anonymous) resident memory."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # the process has just ended
        return 0
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakPrivate:
    """The largest RssAnon seen, sampled every 5 ms on a thread (the kernel keeps no peak of it)."""

    def __init__(self):
        self.peak_kib = status_kib("RssAnon")
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self):
        while self.running:
            self.peak_kib = max(self.peak_kib, status_kib("RssAnon"))
            time.sleep(0.005)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return max(self.peak_kib, status_kib("RssAnon")) * 1024 / 1e9  # GB


# ---------------------------------------------------------------------------- checkpoints


def parameter_shapes(config: dict) -> dict:
    D, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    H, KV = config["num_attention_heads"], config["num_key_value_heads"]
    hd = D // H
    shapes = {"model.embed_tokens.weight": (V, D)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (D,), p + "self_attn.q_proj.weight": (H * hd, D),
                       p + "self_attn.k_proj.weight": (KV * hd, D), p + "self_attn.v_proj.weight": (KV * hd, D),
                       p + "self_attn.o_proj.weight": (D, H * hd), p + "post_attention_layernorm.weight": (D,),
                       p + "mlp.gate_proj.weight": (I, D), p + "mlp.up_proj.weight": (I, D),
                       p + "mlp.down_proj.weight": (D, I)})
    shapes["model.norm.weight"] = (D,)
    shapes["lm_head.weight"] = (V, D)
    return shapes


def write_checkpoint(directory: Path, shape: dict) -> None:
    """Random N(0, 0.02²) weights (norms 1) in the shape's dtype, in shards as the hub lays them out."""
    from llama_np.weights.codecs import float32_to_bf16_bits
    from llama_np.formats.safetensors import save_safetensors

    config, dtype = shape["config"], shape["dtype"]
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = parameter_shapes(config)
    shards, current, size = [], [], 0
    for name, tensor_shape in shapes.items():
        current.append(name)
        size += int(np.prod(tensor_shape)) * 2
        if size >= SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
    if current:
        shards.append(current)
    weight_map = {}
    for index, names in enumerate(shards, start=1):
        file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                values = np.ones(shapes[name], dtype=np.float32)
            else:
                values = rng.standard_normal(shapes[name], dtype=np.float32)
                values *= np.float32(0.02)
            tensors[name] = values.astype(np.float16) if dtype == "float16" else values
            weight_map[name] = file_name
        save_safetensors(directory / file_name, tensors, metadata={"format": "pt"},
                         **({"bf16": True} if dtype == "bfloat16" else {}))
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config_json = dict(config, architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype=dtype,
                       hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    (directory / "config.json").write_text(json.dumps(config_json, indent=2))


def write_vocabulary(directory: Path, size: int) -> None:
    """A sentencepiece tokenizer.model of ``size`` pieces beside the checkpoint: Llama 2's special
    and byte pieces, then made-up words. Only so that llama.cpp loads the GGUF files."""
    from llama_np.formats.sentencepiece_model import BYTE, CONTROL, NORMAL, UNKNOWN, model_proto

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    pieces += [f"\u2581w{i}" for i in range(size - len(pieces))]
    types += [NORMAL] * (size - len(types))
    scores = [0.0] * 259 + [-float(i) for i in range(size - 259)]
    (directory / "tokenizer.model").write_bytes(model_proto(pieces, scores, types, unk_id=0, bos_id=1, eos_id=2))


def write_gguf(checkpoint: Path, gguf_type: str, directory: Path, llama_cpp: Path | None) -> Path | str:
    """The shape's GGUF file of ``gguf_type`` (written once), or why there is none."""
    path = directory / f"model-{gguf_type}.gguf"
    if path.exists():
        return path
    start = time.perf_counter()
    if gguf_type.startswith("Q") and "_K" in gguf_type:  # a k-quant mix: only llama.cpp writes them
        if llama_cpp is None:
            return "needs llama.cpp's llama-quantize (--llama-cpp)"
        f16 = write_gguf(checkpoint, "F16", directory, llama_cpp)
        command = [str(llama_cpp / "llama-quantize"), str(f16), str(path), gguf_type, "2"]
    else:
        command = [sys.executable, "-m", "llama_np", "quantize", str(checkpoint), str(path), "--type", gguf_type]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        path.unlink(missing_ok=True)
        return "could not write it: " + ((done.stderr.strip().splitlines() or ["failed"])[-1])[:80]
    print(f"wrote {path} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return path


def full_model_policy(config: dict, layers: int = 80) -> str:
    """What from_pretrained would choose for the whole model whose first layers a shape holds."""
    from llama_np.weights.memory import keep_widened_limit, streamed_widened_budget

    parameters = sum(int(np.prod(s)) for s in parameter_shapes(dict(config, num_hidden_layers=layers)).values())
    kept = parameters * 4 <= keep_widened_limit()
    budget = 0 if kept else streamed_widened_budget(parameters * 2)
    return (f"the {layers}-layer model ({parameters * 2 / 1e9:.0f} GB in float16) would run here with "
            f"keep_widened={kept} and a widened budget of {budget / 2**30:.1f} GiB, by default")


def evict_files(directory: Path) -> None:
    """Ask the kernel to drop a checkpoint's files from the page cache (clean pages: nothing is lost).

    The shapes' files together (about 20 GB) nearly fill a 24 GB machine's page cache, and then
    every fresh allocation of a run first waits for the kernel to reclaim some of it. Each shape
    is measured as a user holding just that checkpoint would run it: the others evicted first.
    """
    for path in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("gguf/*.gguf")):
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def read_files_once(directory: Path, pattern: str = "*.safetensors") -> float:
    """Read every weight file once so it is in the page cache; seconds taken."""
    start = time.perf_counter()
    for path in sorted(directory.glob(pattern)):
        with open(path, "rb") as f:
            while f.read(64 * 1024**2):
                pass
    return time.perf_counter() - start


# ---------------------------------------------------------------------------- one implementation


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def prompt_ids(length: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(length).integers(3, vocab, size=(1, length))


def measure_llama_np(path: Path, threads: int, repeats: int, new_tokens: int, first_only: int = 0,
                     stream: bool = False) -> dict:
    """Every figure; with ``first_only`` = T, only the process's first forward over T tokens.

    ``stream`` opens the model with keep_widened=False, whatever would fit.
    """
    import llama_np
    from llama_np import LlamaForCausalLM

    peak = PeakPrivate()
    result = {"library": str(Path(llama_np.__file__).parent)}
    options = {"keep_widened": False} if stream else {}
    result["load"] = timed(lambda: result.setdefault("model", LlamaForCausalLM.from_pretrained(path, **options)))
    model = result.pop("model")
    vocab = model.config.vocab_size
    if first_only:
        ids = prompt_ids(first_only, vocab)
        return {"first": timed(lambda: model(ids)), "warm": timed(lambda: model(ids))}
    for length in LENGTHS:
        ids = prompt_ids(length, vocab)
        result[f"first{length}"] = timed(lambda: model(ids))
        result[f"warm{length}"] = statistics.median(timed(lambda: model(ids)) for _ in range(repeats))
    stats = {}
    model.generate(prompt_ids(8, vocab), max_new_tokens=new_tokens, do_sample=False, eos_token_id=[], stats=stats)
    result["tokens_per_second"] = stats["decode_steps"] / stats["decode_seconds"]
    result["peak_private_gb"] = peak.stop()
    # What one decoding step reads: kept (widened) matrices at 4 bytes an element, the rest as stored.
    weights, read = model.weights, 0
    for name in weights.tensors:
        if name == "model.embed_tokens.weight":
            continue  # only the rows of the new tokens are read
        kept = name in weights._widened
        read += int(np.prod(weights.shape(name))) * 4 if kept else weights.tensors[name].nbytes
    result["bytes_per_token"] = read
    result["matmul_parameters"] = sum(int(np.prod(weights.shape(n))) for n in weights.tensors
                                      if n != "model.embed_tokens.weight" and len(weights.shape(n)) == 2)
    return result


def measure_transformers(path: Path, dtype: str, threads: int, repeats: int, new_tokens: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    peak = PeakPrivate()
    result = {"library": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}"}
    start = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation="sdpa").eval()
    result["load"] = time.perf_counter() - start
    vocab = model.config.vocab_size
    with torch.inference_mode():
        for length in LENGTHS:
            ids = torch.tensor(prompt_ids(length, vocab))
            result[f"first{length}"] = timed(lambda: model(ids))
            result[f"warm{length}"] = statistics.median(timed(lambda: model(ids)) for _ in range(repeats))
        out = model(torch.tensor(prompt_ids(8, vocab)), use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        result["tokens_per_second"] = (new_tokens - 1) / (time.perf_counter() - start)
    result["peak_private_gb"] = peak.stop()
    return result


def measure_llama_cpp(bench: Path, path: Path, threads: int, new_tokens: int) -> dict:
    """llama.cpp's llama-bench on the same file: pp8, pp128 and tg as forward seconds and tokens/s,
    and the largest private memory of its process, sampled every 5 ms."""
    import tempfile

    command = [str(bench), "-m", str(path), "-t", str(threads), "-p", ",".join(map(str, LENGTHS)),
               "-n", str(new_tokens), "-r", "3", "-o", "json"]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        peak = 0
        while process.poll() is None:
            peak = max(peak, status_kib("RssAnon", process.pid))
            time.sleep(0.005)
        out.seek(0), err.seek(0)
        if process.returncode != 0:
            return {"error": (err.read().strip().splitlines() or ["failed"])[-1]}
        entries = json.loads(out.read())
    result = {"library": f"llama.cpp {entries[0].get('build_commit', '')}", "load": None, "first8": None,
              "first128": None, "peak_private_gb": peak * 1024 / 1e9}
    for entry in entries:
        if entry["n_gen"]:
            result["tokens_per_second"] = entry["avg_ts"]
        else:
            result[f"warm{entry['n_prompt']}"] = entry["n_prompt"] / entry["avg_ts"]
    return result


def gguf_rows(shape_name: str, shape: dict, path: Path, types: list, llama_cpp: Path | None, all_dirs: list,
              env: dict, threads: int) -> list:
    """llama_np (streamed) and llama.cpp on the shape's GGUF files, one type at a time."""
    rows = []
    if not (path / "tokenizer.model").exists():
        write_vocabulary(path, shape["config"]["vocab_size"])
    for gguf_type in types:
        file = write_gguf(path, gguf_type, path / "gguf", llama_cpp)
        if isinstance(file, str):
            rows.append(dict(shape=shape_name, implementation=f"{gguf_type} GGUF", skipped=file))
            continue
        for directory in all_dirs:
            evict_files(directory)
        print(f"{shape_name} {gguf_type}: page cache warmed in {read_files_once(file.parent, file.name):.0f} s",
              file=sys.stderr)
        common = ["--path", str(file), "--threads", str(threads), "--repeats", str(shape["repeats"]),
                  "--new-tokens", str(shape["new_tokens"])]
        r = child([sys.executable, __file__, "--child", "llama_np", "--stream"] + common, env)
        rows.append(dict(r, shape=shape_name, implementation=f"llama_np {gguf_type} streamed", gguf=gguf_type))
        print(f"  llama_np {gguf_type}: {r}", file=sys.stderr)
        if llama_cpp is not None and (llama_cpp / "llama-bench").exists():
            r = measure_llama_cpp(llama_cpp / "llama-bench", file, threads, shape["new_tokens"] * 4)
            rows.append(dict(r, shape=shape_name, implementation=f"llama.cpp {gguf_type}", gguf=gguf_type))
            print(f"  llama.cpp {gguf_type}: {r}", file=sys.stderr)
    return rows


def gguf_report(results: list) -> None:
    """Each GGUF file: llama_np as a fraction of llama.cpp; each quantised type against F16 in llama_np."""
    by = {(r["shape"], r["implementation"]): r for r in results if "gguf" in r and "error" not in r}
    if not by:
        return
    print("\nGGUF, the same file: llama_np's time / llama.cpp's for a forward; for decoding, our tokens/s "
          "as a fraction of theirs; peak private memory, ours and theirs:")
    for (shape, implementation), ours in by.items():
        theirs = by.get((shape, f"llama.cpp {ours['gguf']}"))
        if not implementation.startswith("llama_np") or theirs is None:
            continue
        print(f"  {shape} {ours['gguf']}: fwd 8 {ours['warm8'] / theirs['warm8']:.2f}x, fwd 128 "
              f"{ours['warm128'] / theirs['warm128']:.2f}x, decoding "
              f"{ours['tokens_per_second'] / theirs['tokens_per_second']:.2f} of their tokens/s, memory "
              f"{ours['peak_private_gb']:.2f} GB / {theirs['peak_private_gb']:.2f} GB")
    print("\nllama_np, each quantised file against the same shape's F16 file (both streamed):")
    for (shape, implementation), ours in by.items():
        f16 = by.get((shape, "llama_np F16 streamed"))
        if not implementation.startswith("llama_np") or f16 is None or ours is f16:
            continue
        print(f"  {shape} {ours['gguf']}: decoding {ours['tokens_per_second'] / f16['tokens_per_second']:.2f}x "
              f"F16's tokens/s, fwd 128 {ours['warm128'] / f16['warm128']:.2f}x F16's time, peak private "
              f"{ours['peak_private_gb']:.2f} GB against {f16['peak_private_gb']:.2f} GB")


# ---------------------------------------------------------------------------- the machine


def machine_limits(threads: int) -> dict:
    """float32 GEMM GFLOP/s (2048³, the BLAS NumPy uses) and read bandwidth (a 1 GiB matrix-vector product)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2048, 2048), dtype=np.float32)
    a @ a
    gemm = min(timed(lambda: a @ a) for _ in range(5))  # a limit: the best of the runs
    big = np.ones((2**28 // 4096, 4096), dtype=np.float32)  # 1 GiB
    x = np.ones(4096, dtype=np.float32)
    big @ x
    read = min(timed(lambda: big @ x) for _ in range(5))
    return {"gemm_gflops": 2 * 2048**3 / gemm / 1e9, "read_gb_per_s": big.nbytes / read / 1e9}


# ---------------------------------------------------------------------------- the report


def child(command: list, env=None) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def torch_python(requested: str | None) -> str | None:
    candidate = requested or sys.executable
    probe = subprocess.run([candidate, "-c", "import torch, transformers"], capture_output=True)
    return candidate if probe.returncode == 0 else None


def row(cells, widths):
    return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"


def seconds(value):
    return "-" if value is None else (f"{value * 1e3:.0f} ms" if value < 1 else f"{value:.2f} s")


def report(results: list, limits: dict) -> None:
    print(f"\nmachine: float32 GEMM {limits['gemm_gflops']:.0f} GFLOP/s, memory read "
          f"{limits['read_gb_per_s']:.1f} GB/s ({limits['threads']} threads)\n")
    print("first fwd T: the first forward of a fresh process over T tokens (llama_np: each its own process;"
          " Transformers: 128 after 8), files in the page cache\n")
    head = ["checkpoint", "implementation", "load", "first fwd 8", "warm fwd 8", "first fwd 128",
            "warm fwd 128", "greedy tokens/s", "peak private"]
    widths = [14, 24, 8, 11, 10, 13, 12, 15, 12]
    print(row(head, widths))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in results:
        if "error" in r or "skipped" in r:
            print(row([r["shape"], r["implementation"], r.get("skipped") or "error: " + r["error"][:60]]
                      + [""] * 6, widths))
            continue
        print(row([r["shape"], r["implementation"], seconds(r.get("load")), seconds(r.get("first8")),
                   seconds(r["warm8"]), seconds(r.get("first128")), seconds(r["warm128"]), f"{r['tokens_per_second']:.2f}",
                   f"{r['peak_private_gb']:.2f} GB"], widths))
    print("\nllama_np against the machine's limits (forward: 2·params·T FLOPs at the GEMM rate; "
          "decoding: the weight bytes one step reads at the read bandwidth):")
    for r in results:
        if not r["implementation"].startswith("llama_np") or "error" in r or "skipped" in r:
            continue
        flops = {T: 2 * r["matmul_parameters"] * T for T in LENGTHS}
        limit = {T: flops[T] / (limits["gemm_gflops"] * 1e9) for T in LENGTHS}
        decode_limit = limits["read_gb_per_s"] * 1e9 / r["bytes_per_token"]
        print(f"  {r['shape']}: warm fwd 8 {limit[8] / r['warm8']:.0%} of {seconds(limit[8])}, "
              f"warm fwd 128 {limit[128] / r['warm128']:.0%} of {seconds(limit[128])}, decoding "
              f"{r['tokens_per_second'] / decode_limit:.0%} of {decode_limit:.2f} tokens/s "
              f"({r['bytes_per_token'] / 1e9:.1f} GB a step)"
              + ("" if "first128" not in r else f"; the first forward of a process, over 128 tokens, takes "
                 f"{r['first128'] / r['warm128']:.2f}x a warm one, over 8 tokens {r['first8'] / r['warm8']:.2f}x")
              + ("" if r["implementation"] == "llama_np" else f" ({r['implementation'][9:]})"))
    by = {(r["shape"], r["implementation"]): r for r in results if "load" in r and "gguf" not in r}
    if any(key[1].startswith("Transformers") for key in by):
        print("\nratios: llama_np's time / Transformers' for a warm forward; for decoding, our tokens/s / theirs:")
    for shape in dict.fromkeys(r["shape"] for r in results):
        ours = by.get((shape, "llama_np"))
        for key, theirs in by.items():
            if key[0] != shape or key[1].startswith("llama_np") or ours is None:
                continue
            print(f"  {shape} vs {key[1]}: fwd 8 {ours['warm8'] / theirs['warm8']:.2f}x, fwd 128 "
                  f"{ours['warm128'] / theirs['warm128']:.2f}x, decoding "
                  f"{ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}x their tokens/s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llama-np-shapes"))
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--model", action="append", default=[], metavar="SHAPE=PATH")
    parser.add_argument("--torch-python", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--gguf", default="", metavar="TYPES",
                        help="also GGUF files of these types, e.g. F16,Q8_0,Q4_0,Q4_K_M")
    parser.add_argument("--gguf-only", action="store_true", help="only the GGUF rows")
    parser.add_argument("--llama-cpp", type=Path, default=None, metavar="DIR",
                        help="llama.cpp's build/bin (llama-bench, llama-quantize); default: found on PATH")
    parser.add_argument("--child", choices=["llama_np", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--new-tokens", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--first-only", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "llama_np":
        print(json.dumps(measure_llama_np(args.path, args.threads, args.repeats, args.new_tokens, args.first_only,
                                          args.stream)))
        return
    if args.child == "transformers":
        print(json.dumps(measure_transformers(args.path, args.dtype, args.threads, args.repeats, args.new_tokens)))
        return

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads))
    given = dict(item.split("=", 1) for item in args.model)
    torch_py = None if args.skip_transformers else torch_python(args.torch_python)
    if torch_py is None and not args.skip_transformers:
        print("Transformers rows left out: no torch here. pip install torch==2.13.0 transformers==5.23.0 "
              "(or pass --torch-python)", file=sys.stderr)
    limits = dict(machine_limits(args.threads), threads=args.threads)
    print(f"machine: {limits['gemm_gflops']:.0f} GFLOP/s, {limits['read_gb_per_s']:.1f} GB/s", file=sys.stderr)
    gguf_types = [t for t in args.gguf.split(",") if t]
    llama_cpp = args.llama_cpp
    if llama_cpp is None and shutil.which("llama-bench"):
        llama_cpp = Path(shutil.which("llama-bench")).parent
    if gguf_types and (llama_cpp is None or not (llama_cpp / "llama-bench").exists()):
        print("llama.cpp rows left out: no llama-bench (build llama.cpp as tests/reference/README.md says, "
              "with --target llama-bench llama-quantize, and pass --llama-cpp DIR/build/bin)", file=sys.stderr)
    results = []
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        path = Path(given.get(shape_name, args.dir / shape_name))
        if not (path / "config.json").exists():
            start = time.perf_counter()
            write_checkpoint(path, shape)
            print(f"wrote {path} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        if gguf_types:
            all_dirs = [Path(given.get(other, args.dir / other)) for other in SHAPES]
            results += gguf_rows(shape_name, shape, path, gguf_types, llama_cpp,
                                 [d for d in all_dirs if d.is_dir()], env, args.threads)
        if args.gguf_only:
            continue
        common = ["--path", str(path), "--threads", str(args.threads), "--repeats", str(shape["repeats"]),
                  "--new-tokens", str(shape["new_tokens"])]
        for other in SHAPES:
            other_path = Path(given.get(other, args.dir / other))
            if other_path != path and other_path.is_dir():
                evict_files(other_path)
        print(f"{shape_name}: page cache warmed in {read_files_once(path):.0f} s", file=sys.stderr)
        r = child([sys.executable, __file__, "--child", "llama_np"] + common, env)
        # The first forward of a process over 128 tokens, apart: above it came after the 8-token ones.
        first = child([sys.executable, __file__, "--child", "llama_np", "--first-only", "128"] + common, env)
        if "error" not in r and "error" not in first:
            r.update(first128=first["first"], first128_then_warm=first["warm"])
        results.append(dict(r, shape=shape_name, implementation="llama_np"))
        print(f"  llama_np: {r}", file=sys.stderr)
        if shape.get("also_streamed"):  # fits widened here, but what does streaming it cost?
            r = child([sys.executable, __file__, "--child", "llama_np", "--stream"] + common, env)
            results.append(dict(r, shape=shape_name, implementation="llama_np keep_widened=False"))
            print(f"  llama_np keep_widened=False: {r}", file=sys.stderr)
        if torch_py is None:
            continue
        parameters = sum(int(np.prod(s)) for s in parameter_shapes(shape["config"]).values())
        for dtype in dict.fromkeys([shape["dtype"], "float32"]):
            label = f"Transformers {dtype}"
            needed = parameters * (4 if dtype == "float32" else 2)
            if needed > available_bytes() - 2 * 1024**3:
                results.append(dict(shape=shape_name, implementation=label,
                                    skipped=f"needs {needed / 1e9:.0f} GB, does not fit"))
                continue
            r = child([torch_py, __file__, "--child", "transformers", "--dtype", dtype] + common, env)
            results.append(dict(r, shape=shape_name, implementation=label))
            print(f"  {label}: {r}", file=sys.stderr)
        if shape_name == "llama2-70b-2l":
            c = shape["config"]
            layer = sum(int(np.prod(s)) for n, s in parameter_shapes(c).items() if n.startswith("model.layers.0."))
            print(f"  70B shape: one layer in float32 {layer * 4 / 1e9:.2f} GB, embeddings in float32 "
                  f"{c['vocab_size'] * c['hidden_size'] * 4 / 1e9:.2f} GB", file=sys.stderr)
            print(f"  {full_model_policy(c)}", file=sys.stderr)
    report(results, limits)
    gguf_report(results)
    if args.json:
        args.json.write_text(json.dumps({"limits": limits, "results": results}, indent=2))


if __name__ == "__main__":
    main()
