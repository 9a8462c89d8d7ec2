"""Run llama.cpp's ``llama-perplexity`` on the bundled model and store what it prints.

llama_np's ``perplexity(..., recipe="llama.cpp")`` and ``kl_divergence`` follow
examples/perplexity/perplexity.cpp at LLAMA_CPP_COMMIT; this script records that tool's numbers
on the same GGUF files and text, so tests/test_perplexity.py can compare them.

    model files (written by ``llama-np quantize`` from the working tree; their SHA-256 equal those
    of llama.cpp's own convert_hf_to_gguf.py --outtype f32 / q8_0, stored in
    tests/data/gguf_quantize/manifest.json):
        tiny-shakespeare-F32.gguf    llama-np quantize tiny-shakespeare OUT --type F32
        tiny-shakespeare-Q8_0.gguf   llama-np quantize tiny-shakespeare OUT --type Q8_0
    text: tests/data/perplexity/julius_caesar_3_2.txt, context CONTEXT, two threads, an F32 KV
    cache (-ctk f32 -ctv f32, so that the cache does not round keys and values to float16).
    runs:
        perplexity      llama-perplexity -m F32 --ppl-output-type 1: per chunk the running
                        perplexity (4 decimals) and mean NLL (6 decimals); then the default
                        output's "Final estimate" line
        base            the same with --kl-divergence-base FILE: FILE holds llama.cpp's token ids
                        of the chunks it ran (before bos replaces each chunk's first token)
        kl_q8_0         llama-perplexity -m Q8_0 --kl-divergence-base FILE --kl-divergence
        kl_f32_self     the same with -m F32: the floor set by FILE's 16-bit log-probabilities
    tests/data/perplexity/llama_cpp.json: commit, date, commands, file hashes, the printed lines,
        the parsed numbers and the token ids.

Run from the repository root with llama-perplexity built from a llama.cpp checkout at
LLAMA_CPP_COMMIT (see tests/reference/README.md):

    cmake --build /tmp/llama.cpp/build -j2 --target llama-perplexity
    python tests/reference/make_llama_cpp_perplexity_reference.py /tmp/llama.cpp
    python -m pytest tests/test_perplexity.py -q
"""

import datetime
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import tempfile

LLAMA_CPP_COMMIT = "c392e5094deaf2d1a7c18683214f007fad3fe42b"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = os.path.join("tests", "data", "perplexity", "julius_caesar_3_2.txt")
OUT = os.path.join(ROOT, "tests", "data", "perplexity", "llama_cpp.json")
CONTEXT = 128
COMMON_FLAGS = ["-c", str(CONTEXT), "-t", "2", "-ctk", "f32", "-ctv", "f32"]
TYPES = ("F32", "Q8_0")


def sha256(path):
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def run(command):
    """stdout of a command that must succeed (llama.cpp logs to stderr, results to stdout)."""
    return subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout


def number(pattern, text):
    match = re.search(pattern, text)
    if match is None:
        raise SystemExit(f"llama-perplexity printed no line matching {pattern!r}:\n{text}")
    return [float(value) for value in match.groups()]


def read_base_tokens(path):
    """n_ctx, n_vocab, n_chunk and the chunk tokens from the head of a --kl-divergence-base file:
    "_logits_", uint32 n_ctx, int32 n_vocab, int32 n_chunk, int32 tokens[n_ctx * n_chunk]."""
    with open(path, "rb") as file:
        if file.read(8) != b"_logits_":
            raise SystemExit(f"{path} is not a llama-perplexity logits file")
        n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", file.read(12))
        tokens = list(struct.unpack(f"<{n_ctx * n_chunk}i", file.read(4 * n_ctx * n_chunk)))
    return n_ctx, n_vocab, n_chunk, tokens


def kl_summary(text):
    """The numbers of the "====== Perplexity statistics ======" block and the KL lines."""
    pair = r"\s*(-?[\d.]+) ±\s*(-?[\d.]+)"
    percent = r"\s*(-?[\d.]+) ±\s*(-?[\d.]+) %"
    return {
        "ppl": number(r"Mean PPL\(Q\)\s*:" + pair, text),
        "ppl_reference": number(r"Mean PPL\(base\)\s*:" + pair, text),
        "ln_ppl_ratio": number(r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:" + pair, text),
        "ppl_ratio": number(r"Mean PPL\(Q\)/PPL\(base\)\s*:" + pair, text),
        "ppl_difference": number(r"Mean PPL\(Q\)-PPL\(base\)\s*:" + pair, text),
        "mean_kl": number(r"Mean    KLD:" + pair, text),
        "max_kl": number(r"Maximum KLD:\s*(-?[\d.]+)", text)[0],
        "median_kl": number(r"Median  KLD:\s*(-?[\d.]+)", text)[0],
        "rms_probability_difference_percent": number(r"RMS Δp    :" + percent, text),
        "same_top_percent": number(r"Same top p:" + percent, text),
    }


def main():
    llama_cpp = sys.argv[1] if len(sys.argv) > 1 else "/tmp/llama.cpp"
    tool = os.path.join(llama_cpp, "build", "bin", "llama-perplexity")
    commit = subprocess.run(["git", "-C", llama_cpp, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if commit and commit != LLAMA_CPP_COMMIT:
        raise SystemExit(f"{llama_cpp} is at {commit}, not {LLAMA_CPP_COMMIT}")
    environment = dict(os.environ, PYTHONPATH=ROOT)
    with tempfile.TemporaryDirectory() as work:
        files = {}
        for type_name in TYPES:
            path = os.path.join(work, f"tiny-shakespeare-{type_name}.gguf")
            subprocess.run([sys.executable, "-m", "llama_np", "quantize", "tiny-shakespeare", path, "--type", type_name],
                           check=True, capture_output=True, env=environment, cwd=ROOT)
            files[type_name] = path
        base = os.path.join(work, "base.kld")
        commands = {
            "perplexity": [tool, "-m", files["F32"], "-f", TEXT, *COMMON_FLAGS, "--ppl-output-type", "1"],
            "final": [tool, "-m", files["F32"], "-f", TEXT, *COMMON_FLAGS],
            "base": [tool, "-m", files["F32"], "-f", TEXT, *COMMON_FLAGS, "--kl-divergence-base", base],
            "kl_q8_0": [tool, "-m", files["Q8_0"], "-f", TEXT, *COMMON_FLAGS, "--kl-divergence-base", base,
                        "--kl-divergence"],
            "kl_f32_self": [tool, "-m", files["F32"], "-f", TEXT, *COMMON_FLAGS, "--kl-divergence-base", base,
                            "--kl-divergence"],
        }
        printed = {}
        for name, command in commands.items():
            printed[name] = run(command)
        # the final estimate is logged to stderr
        final = subprocess.run(commands["final"], check=True, capture_output=True, text=True, cwd=ROOT).stderr
        n_ctx, n_vocab, n_chunk, tokens = read_base_tokens(base)
        hashes = {f"tiny-shakespeare-{type_name}.gguf": sha256(path) for type_name, path in files.items()}

    def shown(command):
        return " ".join(os.path.basename(part) if part.startswith(work) else part for part in command) \
            .replace(tool, "llama-perplexity")

    chunks = [{"chunk": index + 1, "perplexity": float(ppl), "nll": float(nll)}
              for index, (ppl, nll) in enumerate(re.findall(r"^\s*\d+\s+([\d.]+)\s+([\d.]+)\s+[\d.]+$",
                                                           printed["perplexity"], re.MULTILINE))]
    final_ppl, final_error = number(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", final)
    reference = {
        "generator": "tests/reference/make_llama_cpp_perplexity_reference.py",
        "date": datetime.date.today().isoformat(),
        "llama_cpp_commit": LLAMA_CPP_COMMIT,
        "tool": "llama-perplexity (examples/perplexity/perplexity.cpp), CPU build, 2 threads, F32 KV cache",
        "text": TEXT.replace(os.sep, "/"),
        "context": CONTEXT,
        "files": {name: {"sha256": digest, "written_by": f"llama-np quantize tiny-shakespeare {name} --type "
                                                          f"{name.rsplit('-', 1)[1][:-5]}"}
                  for name, digest in hashes.items()},
        "commands": {name: shown(command) for name, command in commands.items()},
        "n_ctx": n_ctx, "n_vocab": n_vocab, "n_chunk": n_chunk,
        "scored_tokens": n_chunk * (n_ctx - 1 - n_ctx // 2),
        "chunk_token_ids": tokens,
        "perplexity": {"final": final_ppl, "final_error": final_error, "chunks": chunks},
        "kl_q8_0": kl_summary(printed["kl_q8_0"]),
        "kl_f32_self": kl_summary(printed["kl_f32_self"]),
        "printed": {"final": re.findall(r"Final estimate: .*", final),
                    "kl_q8_0": printed["kl_q8_0"].split("====== Perplexity statistics ======")[1].strip().splitlines(),
                    "kl_f32_self": printed["kl_f32_self"].split("====== Perplexity statistics ======")[1]
                    .strip().splitlines()},
    }
    with open(OUT, "w", encoding="utf-8") as file:
        json.dump(reference, file, indent=1, ensure_ascii=False)
        file.write("\n")
    print(f"wrote {OUT}: PPL {final_ppl}, {len(chunks)} chunks, Q8_0 mean KLD {reference['kl_q8_0']['mean_kl']}")


if __name__ == "__main__":
    main()
