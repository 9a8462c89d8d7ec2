"""Quantise a small random Llama with llama.cpp's llama-quantize to k-quants, and store what
Transformers computes loading each file.

A seeded random Llama (KQUANT_CONFIG: every matrix row a multiple of 256 numbers, the k-quant
super-block; GQA 4:2; two layers; the 1,000-piece sentencepiece model of tests/data/tokenizer,
so the vocabulary is 1,000) is saved as a Hugging Face directory (config.json in Transformers
4.x's spelling, which that converter reads), turned into GGUF F32 by llama.cpp's
``convert_hf_to_gguf.py --outtype f32`` and then quantised by ``llama-quantize F32.gguf OUT TYPE``
for each TYPE in KQUANT_TYPES, without ``--pure``: llama-quantize picks each tensor's type its
own way (Q4_K_M keeps attn_v, ffn_down and output partly in Q6_K, and so on).

    tests/data/gguf_kquant/
        kquant-<TYPE>.gguf   llama-quantize's files, kept whole
        reference.npz        "input_ids" (2, 7) and "prompt_ids" (1, n): seeded ids and the
                             sentencepiece ids of PROMPT with <s>; per file stem
                             "<stem>/logits" (2, 7, 1000) Transformers' float32 logits for
                             input_ids and "<stem>/generated" its greedy generation of NEW_TOKENS
                             tokens from prompt_ids
        manifest.json        llama.cpp commit, versions, date, the config, and per file: bytes,
                             SHA-256, the smallest greedy top-1/top-2 gap and the type of every
                             tensor as the gguf package reads it

Transformers loads each file with ``from_pretrained(directory, gguf_file=name)`` (float32, eager
attention, one thread): it dequantises every tensor with ``gguf.quants.dequantize``.

Run from the repository root with a llama.cpp checkout at LLAMA_CPP_COMMIT whose llama-quantize
is built (see make_gguf_quantize_reference.py), in the virtualenv of requirements.txt plus gguf
and sentencepiece:

    /tmp/ref5/bin/python tests/reference/make_gguf_kquant_reference.py /tmp/llama.cpp
"""

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import gguf
import numpy as np
import sentencepiece
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from make_gguf_reference import NEW_TOKENS, transformers_outputs  # this folder; Transformers' gguf_file= run

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "tests", "data", "gguf_kquant")
TOKENIZER = os.path.join(ROOT, "tests", "data", "tokenizer", "tokenizer.model")
LLAMA_CPP_COMMIT = "c392e5094deaf2d1a7c18683214f007fad3fe42b"
KQUANT_TYPES = ["Q4_K_M", "Q5_K_M", "Q6_K"]
KQUANT_CONFIG = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1000,
                 "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                 "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
                 "initializer_range": 0.05}
LM_HEAD_STD = 0.25  # wider than the rest, so that greedy steps are not near-ties
PROMPT = "ROMEO: But soft, what light"


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_source(directory: str) -> None:
    """The seeded random checkpoint: normal(0, initializer_range) matrices, lm_head normal(0,
    LM_HEAD_STD), norms around 1."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**KQUANT_CONFIG)).to(torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            elif name == "lm_head.weight":
                parameter.normal_(0.0, LM_HEAD_STD)
    model.save_pretrained(directory)
    with open(os.path.join(directory, "config.json")) as f:  # 4.x spelling: the converter reads rope_theta
        config = json.load(f)
    rope = config.pop("rope_parameters", None)
    config["rope_theta"] = rope["rope_theta"] if rope else KQUANT_CONFIG["rope_theta"]
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shutil.copyfile(TOKENIZER, os.path.join(directory, "tokenizer.model"))


def tensor_types(path: str) -> dict:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def main(llama_cpp: str) -> None:
    try:
        commit = subprocess.run(["git", "-C", llama_cpp, "rev-parse", "HEAD"], check=True, capture_output=True,
                                text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # an exported tree: nothing to check
        commit = LLAMA_CPP_COMMIT
    if commit != LLAMA_CPP_COMMIT:
        raise SystemExit(f"{llama_cpp} is at {commit}; check out {LLAMA_CPP_COMMIT}")
    converter = os.path.join(llama_cpp, "convert_hf_to_gguf.py")
    quantizer = os.path.join(llama_cpp, "build", "bin", "llama-quantize")
    if not os.path.isfile(quantizer):
        raise SystemExit(f"{quantizer} is missing: build it first")
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(0)
    input_ids = rng.integers(3, KQUANT_CONFIG["vocab_size"], size=(2, 7))
    processor = sentencepiece.SentencePieceProcessor(model_file=TOKENIZER)
    prompt_ids = np.array([[KQUANT_CONFIG["bos_token_id"]] + processor.encode(PROMPT)], dtype=np.int64)
    arrays = {"input_ids": input_ids, "prompt_ids": prompt_ids}
    files = {}
    with tempfile.TemporaryDirectory() as work:
        source = os.path.join(work, "kquant")
        write_source(source)
        f32 = os.path.join(work, "kquant-F32.gguf")
        subprocess.run([sys.executable, converter, source, "--outtype", "f32", "--outfile", f32], check=True,
                       capture_output=True, env=dict(os.environ, PYTHONPATH=os.path.join(llama_cpp, "gguf-py")))
        for type_name in KQUANT_TYPES:
            name = f"kquant-{type_name}.gguf"
            path = os.path.join(OUT, name)
            subprocess.run([quantizer, f32, path, type_name], check=True, capture_output=True)
            logits, generated, gap = transformers_outputs(OUT, name, input_ids, prompt_ids)
            stem = name[: -len(".gguf")]
            arrays[f"{stem}/logits"] = logits.astype(np.float32)
            arrays[f"{stem}/generated"] = generated
            types = tensor_types(path)
            counts = {}
            for t in types.values():
                counts[t] = counts.get(t, 0) + 1
            files[name] = {"command": f"llama-quantize kquant-F32.gguf {name} {type_name}", "type": type_name,
                           "bytes": os.path.getsize(path), "sha256": sha256(path),
                           "smallest_greedy_gap": round(gap, 6), "type_counts": dict(sorted(counts.items())),
                           "tensor_types": types}
    np.savez(os.path.join(OUT, "reference.npz"), **arrays)
    manifest = {
        "written_by": "tests/reference/make_gguf_kquant_reference.py",
        "date": datetime.date.today().isoformat(),
        "llama_cpp_commit": LLAMA_CPP_COMMIT,
        "source": "a seeded random Llama (config below, float32) with tests/data/tokenizer/tokenizer.model, "
                  "converted by convert_hf_to_gguf.py --outtype f32 into kquant-F32.gguf (not stored)",
        "config": KQUANT_CONFIG,
        "prompt": PROMPT,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "gguf": importlib.metadata.version("gguf"),
                     "numpy": np.__version__, "sentencepiece": importlib.metadata.version("sentencepiece")},
        "files": files,
        "arrays": {
            "input_ids": "(2, 7) int64 token ids, seeded",
            "prompt_ids": "(1, n) int64: <s> and the sentencepiece ids of the prompt",
            "<file stem>/logits": "(2, 7, 1000) float32: Transformers' logits for input_ids, loading the "
                                  "file with gguf_file=, float32, eager attention",
            "<file stem>/generated": f"(1, n + {NEW_TOKENS}) int64: greedy generate from prompt_ids",
        },
    }
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    print(json.dumps({n: {k: v for k, v in f.items() if k != "tensor_types"} for n, f in files.items()}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
