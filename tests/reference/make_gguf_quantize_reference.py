"""Run llama.cpp's own converter and quantizer on small checkpoints and store what they write.

``convert_hf_to_gguf.py --outtype f32|f16|bf16|q8_0`` is how llama.cpp turns a Hugging Face
directory into a GGUF file, and ``llama-quantize --pure F32.gguf OUT.gguf Q4_0`` how it
quantises one; ``llama-np quantize --type …`` should write the same bytes from the same input.
The converter runs from a llama.cpp checkout at LLAMA_CPP_COMMIT, with that checkout's own
``gguf-py`` first on the Python path, in the reference virtualenv (it needs torch, numpy and
sentencepiece); llama-quantize is that checkout's, built on the CPU (see the README).

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
        gqa_f32            tests/data/fixtures/gqa_f32 (F32, GQA 8:2, every row a multiple of
                           32 numbers, which llama-quantize needs) with its config.json in the 4.x
                           spelling (stored as gqa_f32/config.json) and the 96-piece
                           tokenizer.model of tests/data/meta/gqa_2shards-hf (the converter needs
                           one; the vocabulary of 256 is padded with [PADi] tokens); its F32 file
                           is then quantised by llama-quantize --pure to Q4_0, Q4_1, Q5_0, Q5_1
                           and Q8_0
    tests/data/gguf_quantize/
        <source>/config.json           the rewritten configs
        gqa_2shards-hf-Q8_0.gguf       the converter's Q8_0 file of gqa_2shards-hf (37 KB) and
        gqa_f32-F32-Q4_0.gguf          llama-quantize's Q4_0 file of gqa_f32 (68 KB), kept whole
        manifest.json   llama.cpp commit, versions, date, and per file: the tool and its input,
                        bytes and SHA-256 of what it wrote; and "llama_simple": the text
                        llama.cpp's llama-simple example (greedy) generates from RUN_PROMPT with
                        the converter's tiny-shakespeare-Q8_0.gguf, RUN_TOKENS tokens

Run from the repository root with a llama.cpp checkout (no build is needed):

    git clone https://github.com/ggml-org/llama.cpp /tmp/llama.cpp
    git -C /tmp/llama.cpp checkout c392e5094deaf2d1a7c18683214f007fad3fe42b
    cmake -S /tmp/llama.cpp -B /tmp/llama.cpp/build -DLLAMA_CURL=OFF
    cmake --build /tmp/llama.cpp/build -j2 --target llama-quantize llama-simple
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
    "gqa_f32": os.path.join(ROOT, "tests", "data", "fixtures", "gqa_f32"),
}
CONFIGS_REWRITTEN = ("tiny-shakespeare", "gqa_f32")  # 5.x spelling -> 4.x
BORROWED_TOKENIZER = {"gqa_f32": os.path.join(ROOT, "tests", "data", "meta", "gqa_2shards-hf", "tokenizer.model")}
QUANTIZED = {"gqa_f32": ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]}  # llama-quantize --pure from its F32 file
OUTTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}  # converter's -> llama-np's
RUN_FILE, RUN_PROMPT, RUN_TOKENS = "tiny-shakespeare-Q8_0.gguf", "ROMEO: But soft, what light", 24
KEPT_WHOLE = ["gqa_2shards-hf-Q8_0.gguf", "gqa_f32-F32-Q4_0.gguf"]
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
    quantizer = os.path.join(llama_cpp, "build", "bin", "llama-quantize")
    runner = os.path.join(llama_cpp, "build", "bin", "llama-simple")
    for tool in (quantizer, runner):
        if not os.path.isfile(tool):
            raise SystemExit(f"{tool} is missing: build it first (see this script's docstring)")
    environment = dict(os.environ, PYTHONPATH=os.path.join(llama_cpp, "gguf-py"))
    os.makedirs(OUT, exist_ok=True)
    files = {}
    with tempfile.TemporaryDirectory() as work:
        for source, directory in SOURCES.items():
            copy = os.path.join(work, source)
            shutil.copytree(directory, copy, ignore=shutil.ignore_patterns(*LEFT_OUT))
            if source in BORROWED_TOKENIZER:
                shutil.copyfile(BORROWED_TOKENIZER[source], os.path.join(copy, "tokenizer.model"))
            if source in CONFIGS_REWRITTEN:
                config_in_4x_spelling(os.path.join(copy, "config.json"))
                os.makedirs(os.path.join(OUT, source), exist_ok=True)
                shutil.copyfile(os.path.join(copy, "config.json"), os.path.join(OUT, source, "config.json"))
            for outtype, type_name in OUTTYPES.items():
                name = f"{source}-{type_name}.gguf"
                path = os.path.join(work, name)
                subprocess.run([sys.executable, converter, copy, "--outtype", outtype, "--outfile", path],
                               check=True, env=environment, capture_output=True)
                files[name] = {"source": source, "tool": f"convert_hf_to_gguf.py --outtype {outtype}",
                               "llama_np_type": type_name, "bytes": os.path.getsize(path), "sha256": sha256(path)}
            for type_name in QUANTIZED.get(source, []):
                name = f"{source}-F32-{type_name}.gguf"
                path = os.path.join(work, name)
                subprocess.run([quantizer, "--pure", os.path.join(work, f"{source}-F32.gguf"), path, type_name],
                               check=True, capture_output=True)
                files[name] = {"source": source, "tool": f"llama-quantize --pure {source}-F32.gguf {type_name}",
                               "from": f"{source}-F32.gguf", "llama_np_type": type_name,
                               "bytes": os.path.getsize(path), "sha256": sha256(path)}
        for name in KEPT_WHOLE:
            shutil.copyfile(os.path.join(work, name), os.path.join(OUT, name))
        # llama-simple prints the prompt (with <s>) and each new token as it comes, then "\n"
        printed = subprocess.run([runner, "-m", os.path.join(work, RUN_FILE), "-n", str(RUN_TOKENS), RUN_PROMPT],
                                 check=True, capture_output=True, text=True).stdout
        run = {"file": RUN_FILE, "prompt": RUN_PROMPT, "n_predict": RUN_TOKENS, "text": printed[:-1],
               "command": f"llama-simple -m {RUN_FILE} -n {RUN_TOKENS} '{RUN_PROMPT}'"}
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
        "quantizer": "llama-quantize --pure <source>-F32.gguf <out> <type>, built from the same checkout "
                     f"({platform.machine()}, {platform.system()})",
        "versions": {"python": platform.python_version(), "torch": importlib.metadata.version("torch"),
                     "numpy": importlib.metadata.version("numpy"),
                     "sentencepiece": importlib.metadata.version("sentencepiece")},
        "sources": {
            "tiny-shakespeare": "llama_np/assets/tiny-shakespeare with config.json in the 4.x spelling "
                                "(stored here as tiny-shakespeare/config.json), in a directory of that name",
            "gqa_2shards-hf": "tests/data/meta/gqa_2shards-hf without reference.npz, in a directory of that name",
            "gqa_f32": "tests/data/fixtures/gqa_f32 without reference.npz, config.json in the 4.x spelling "
                       "(stored here as gqa_f32/config.json), with tests/data/meta/gqa_2shards-hf/tokenizer.model, "
                       "in a directory of that name",
        },
        "kept_whole": KEPT_WHOLE,
        "llama_simple": run,
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
