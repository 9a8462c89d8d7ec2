"""Time and peak memory of converting a Meta-format checkpoint: llama-np convert, and optionally
Transformers' convert_llama_weights_to_hf.py on the same files.

Writes a random bfloat16 checkpoint of the given shape in Meta's layout (tests/torch_files.py,
no torch needed; a layer of Llama 2 7B is dim 4096, 32 heads, multiple_of 256), with a
tokenizer.model of as many pieces as the vocabulary (the test tokenizer padded with filler
pieces), then runs each converter in a child process and reports its wall time and peak resident
memory (GNU time's %M). Everything is written under --work and deleted afterwards unless
--keep is given. From the repository root, in the development virtualenv:

    python tests/reference/measure_conversion.py --layers 32 --work /tmp/measure-7b
    python tests/reference/measure_conversion.py --layers 8 --work /tmp/measure-2b \\
        --transformers-python /tmp/refmeta/bin/python

The Transformers run needs the virtualenv of requirements-meta.txt.
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from torch_files import write_random_meta_checkpoint  # noqa: E402

from llama_np.text.tokenizer import LlamaTokenizer  # noqa: E402

TEST_TOKENIZER = REPO / "tests" / "data" / "tokenizer" / "tokenizer.model"


def padded_tokenizer(path: Path, pieces: int) -> None:
    """The test tokenizer.model with filler pieces appended up to ``pieces``.

    A sentencepiece model is a protobuf ModelProto whose field 1 repeats one SentencePiece
    message per piece ({1: text, 2: score}); fields may come in any order, so appending more
    field-1 messages at the end adds pieces.
    """
    data = bytearray(TEST_TOKENIZER.read_bytes())
    existing = LlamaTokenizer(TEST_TOKENIZER).vocab_size
    for i in range(existing, pieces):
        text = f"\u2581filler{i}".encode("utf-8")
        piece = b"\x0a" + _varint(len(text)) + text + b"\x15" + struct.pack("<f", -1e4 - i)
        data += b"\x0a" + _varint(len(piece)) + piece
    path.write_bytes(bytes(data))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def run_measured(command, work: Path, env=None) -> dict:
    """Run a command under GNU time: its wall time and peak resident memory.

    Not wait4 from here: Linux starts a forked child's peak RSS at its parent's, and this
    process has just generated the checkpoint. GNU time is a small process to fork from.
    """
    report = work / "time.txt"
    run = subprocess.run(["/usr/bin/time", "-o", str(report), "-f", "%e %M", *command], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{command[:3]} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    seconds, kilobytes = report.read_text().split()[-2:]
    return {"seconds": float(seconds), "peak_rss_gb": round(int(kilobytes) * 1024 / 1e9, 2)}


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="llama-np convert's --dtype (default: the stored bfloat16)")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--transformers-python", help="a python with torch and transformers 4.45.2")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if args.work.exists():
        raise SystemExit(f"{args.work} exists; give a new directory")
    meta = args.work / "meta"
    params = {"dim": args.dim, "multiple_of": 256, "n_heads": args.heads, "n_layers": args.layers,
              "norm_eps": 1e-05, "vocab_size": -1}
    try:
        started = time.perf_counter()
        tensor_bytes = write_random_meta_checkpoint(meta, params, shards=args.shards, vocab_size=args.vocab)
        padded_tokenizer(meta / "tokenizer.model", args.vocab)
        report = {"params": params, "shards": args.shards, "vocab": args.vocab,
                  "meta_gb": round(directory_bytes(meta) / 1e9, 2),
                  "tensor_gb": round(tensor_bytes / 1e9, 2),
                  "write_seconds": round(time.perf_counter() - started, 1)}
        ours = args.work / "llama-np"
        dtype = ["--dtype", args.dtype] if args.dtype else []
        report["llama_np"] = run_measured([sys.executable, "-m", "llama_np", "convert", str(meta), str(ours), *dtype],
                                          args.work)
        report["llama_np"]["output_gb"] = round(directory_bytes(ours) / 1e9, 2)
        shutil.rmtree(ours)
        if args.transformers_python:
            theirs = args.work / "transformers"
            report["transformers"] = run_measured(
                [args.transformers_python, "-m", "transformers.models.llama.convert_llama_weights_to_hf",
                 "--input_dir", str(meta), "--num_shards", str(args.shards), "--llama_version", "2",
                 "--output_dir", str(theirs)],
                args.work, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
            report["transformers"]["output_gb"] = round(directory_bytes(theirs) / 1e9, 2)
        print(json.dumps(report, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
