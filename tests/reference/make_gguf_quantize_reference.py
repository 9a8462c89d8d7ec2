"""Run llama.cpp's own converter on small checkpoints and store what it writes (by SHA-256).

``convert_hf_to_gguf.py --outtype f32|f16|bf16|q8_0`` is how llama.cpp turns a Hugging Face
directory into a GGUF file; ``llama-np quantize --type F32|F16|BF16|Q8_0`` should write the same
bytes. The converter runs from a llama.cpp checkout at LLAMA_CPP_COMMIT, with that checkout's
own ``gguf-py`` first on the Python path, in the reference virtualenv (it needs torch, numpy and
sentencepiece).

    sources (each copied into a temporary directory of the same name, which the converter turns
    into general.name):
        tiny-shakespeare   llama_np/assets/tiny-shakespeare (GQA 8:2, F16, 688-wide ffn rows, so
                           down_proj falls back to F16 in Q8_0), with its config.json rewritten
                           in Transformers 4.x's spelling (``rope_theta``, ``torch_dtype``): the
                           converter of that commit reads ``rope_theta`` only at the top level
                           and would leave llama.rope.freq_base out of a 5.x config. The
                           rewritten file is stored as tiny-shakespeare/config.json.
        gqa_2shards-hf     tests/data/meta/gqa_2shards-hf (BF16, 4.x config, tokenizer.json,
                           72-wide ffn rows), without its reference.npz
    tests/data/gguf_quantize/
        tiny-shakespeare/config.json   the rewritten config of the first source
        gqa_2shards-hf-Q8_0.gguf       the converter's Q8_0 file of the second source (37 KB),
                                       kept whole
        manifest.json   llama.cpp commit, versions, date, and per file: source, --outtype,
                        bytes and SHA-256 of what the converter wrote

Run from the repository root with a llama.cpp checkout (no build is needed):

    git clone https://github.com/ggml-org/llama.cpp /tmp/llama.cpp
    git -C /tmp/llama.cpp checkout c392e5094deaf2d1a7c18683214f007fad3fe42b
    /tmp/ref5/bin/python tests/reference/make_gguf_quantize_reference.py /tmp/llama.cpp
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "tests", "data", "gguf_quantize")
LLAMA_CPP_COMMIT = "c392e5094deaf2d1a7c18683214f007fad3fe42b"
SOURCES = {
    "tiny-shakespeare": os.path.join(ROOT, "llama_np", "assets", "tiny-shakespeare"),
    "gqa_2shards-hf": os.path.join(ROOT, "tests", "data", "meta", "gqa_2shards-hf"),
}
OUTTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}  # converter's -> llama-np's
KEPT_WHOLE = ["gqa_2shards-hf-Q8_0.gguf"]
LEFT_OUT = ("reference.npz",)  # test data beside the checkpoint, not part of it


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def config_in_4x_spelling(path: str) -> None:
    """rope_parameters -> rope_theta (+ rope_scaling), dtype -> torch_dtype, in place."""
    with open(path) as f:
        config = json.load(f)
    rope = config.pop("rope_parameters", None)
    if rope is not None:
        config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            raise SystemExit(f"{path}: only default RoPE is rewritten here")
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def checkout_commit(llama_cpp: str) -> str:
    try:
        return subprocess.run(["git", "-C", llama_cpp, "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # an exported tree (git archive): nothing to check
        print(f"{llama_cpp} is not a git checkout: taken to be an export of {LLAMA_CPP_COMMIT}", file=sys.stderr)
        return LLAMA_CPP_COMMIT


def main(llama_cpp: str) -> None:
    commit = checkout_commit(llama_cpp)
    if commit != LLAMA_CPP_COMMIT:
        raise SystemExit(f"{llama_cpp} is at {commit}; check out {LLAMA_CPP_COMMIT}")
    converter = os.path.join(llama_cpp, "convert_hf_to_gguf.py")
    environment = dict(os.environ, PYTHONPATH=os.path.join(llama_cpp, "gguf-py"))
    os.makedirs(OUT, exist_ok=True)
    files = {}
    with tempfile.TemporaryDirectory() as work:
        for source, directory in SOURCES.items():
            copy = os.path.join(work, source)
            shutil.copytree(directory, copy, ignore=shutil.ignore_patterns(*LEFT_OUT))
            if source == "tiny-shakespeare":
                config_in_4x_spelling(os.path.join(copy, "config.json"))
                os.makedirs(os.path.join(OUT, source), exist_ok=True)
                shutil.copyfile(os.path.join(copy, "config.json"), os.path.join(OUT, source, "config.json"))
            for outtype, type_name in OUTTYPES.items():
                name = f"{source}-{type_name}.gguf"
                path = os.path.join(work, name)
                subprocess.run([sys.executable, converter, copy, "--outtype", outtype, "--outfile", path],
                               check=True, env=environment, capture_output=True)
                files[name] = {"source": source, "outtype": outtype, "llama_np_type": type_name,
                               "bytes": os.path.getsize(path), "sha256": sha256(path)}
                if name in KEPT_WHOLE:
                    shutil.copyfile(path, os.path.join(OUT, name))
    gguf_py = {}
    with open(os.path.join(llama_cpp, "gguf-py", "pyproject.toml")) as f:
        for line in f:
            if line.startswith("version"):
                gguf_py["version"] = line.split("=")[1].strip().strip('"')
                break
    manifest = {
        "written_by": "tests/reference/make_gguf_quantize_reference.py",
        "date": datetime.date.today().isoformat(),
        "llama_cpp_commit": LLAMA_CPP_COMMIT,
        "converter": "convert_hf_to_gguf.py --outtype <outtype>, with the checkout's gguf-py "
                     f"{gguf_py.get('version', '?')}",
        "versions": {"python": platform.python_version(), "torch": importlib.metadata.version("torch"),
                     "numpy": importlib.metadata.version("numpy"),
                     "sentencepiece": importlib.metadata.version("sentencepiece")},
        "sources": {
            "tiny-shakespeare": "llama_np/assets/tiny-shakespeare with config.json in the 4.x spelling "
                                "(stored here as tiny-shakespeare/config.json), in a directory of that name",
            "gqa_2shards-hf": "tests/data/meta/gqa_2shards-hf without reference.npz, in a directory of that name",
        },
        "kept_whole": KEPT_WHOLE,
        "files": files,
    }
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    print(json.dumps(files, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
