"""Write small Meta-format Llama checkpoints with torch.save, and Transformers' conversion of each.

Meta's original downloads are `consolidated.NN.pth` (one per model-parallel shard), `params.json`
and `tokenizer.model` (docs/reference.md §9). This script writes tiny random ones in that layout
with torch.save, in bfloat16 as Meta ships, then runs Transformers 4.45.2's own
`convert_llama_weights_to_hf.py` on each (its last version before the script moved) and stores:

    tests/data/meta/tokenizer.model            a 96-piece sentencepiece BPE model (Llama 2 settings)
    tests/data/meta/<case>/                    the Meta directory: consolidated.NN.pth, params.json,
                                               tokenizer.model
    tests/data/meta/<case>-hf/                 Transformers' conversion: config.json,
                                               generation_config.json, model.safetensors, tokenizer files
    tests/data/meta/<case>-hf/reference.npz    input_ids (2, 7) and the converted model's float32
                                               logits (2, 7, V), eager attention
    tests/data/meta/mha_1shard-hf-bin/         the same model saved by Transformers with
                                               safe_serialization=False (pytorch_model.bin)
    tests/data/meta/manifest.json              versions, date, what every case and file holds

Run from the repository root in the virtualenv of requirements-meta.txt (CPU-only torch):

    python tests/reference/make_meta_reference.py
"""

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys

import numpy as np
import torch
import transformers
from transformers import LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from llama2_sentencepiece import train_llama2_style_tokenizer  # noqa: E402

OUT = os.path.normpath(os.path.join(HERE, "..", "data", "meta"))
WORK = os.path.join(HERE, "_work", "meta")
SCRIPT = "tests/reference/make_meta_reference.py"
VOCAB_SIZE = 96
WEIGHT_STD = 0.1  # as the other fixtures: logits spread widely, attention far from uniform

if not transformers.__version__.startswith("4.45."):
    raise SystemExit(f"needs transformers 4.45.x (its convert_llama_weights_to_hf.py), found "
                     f"{transformers.__version__}")

# The cases, each a Llama 2 release in miniature. Meta's own files, for comparison:
# 7B {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}, 1 shard
# 13B dim 5120, 40 heads, 40 layers, 2 shards
# 70B dim 8192, 64 heads, "n_kv_heads": 8, "ffn_dim_multiplier": 1.3, "multiple_of": 4096, 8 shards
CASES = {
    "mha_1shard": dict(
        description="7B's layout: one consolidated.00.pth, multi-head attention (no n_kv_heads), "
                    "multiple_of 16 (intermediate 96 from int(8*32/3) = 85), vocab_size -1",
        params={"dim": 32, "multiple_of": 16, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-05,
                "vocab_size": -1},
        shards=1),
    "mha_2shards": dict(
        description="13B's layout: two model-parallel shards, column-parallel weights split by rows, "
                    "row-parallel ones and tok_embeddings by columns, norms replicated; in each shard "
                    "a layer's tensors are views of one storage, as in Meta's files",
        params={"dim": 32, "multiple_of": 16, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-05,
                "vocab_size": -1},
        shards=2, shared_storage=True),
    "gqa_2shards": dict(
        description="70B's layout in miniature: grouped-query attention (n_kv_heads 2 of 4 heads, one "
                    "key/value head per shard), ffn_dim_multiplier 0.8 and multiple_of 24 "
                    "(int(0.8*85) = 68 rounded up to 72), rope_theta 1e6 (so 16384 positions), two shards",
        params={"dim": 32, "ffn_dim_multiplier": 0.8, "multiple_of": 24, "n_heads": 4, "n_kv_heads": 2,
                "n_layers": 2, "norm_eps": 1e-05, "rope_theta": 1000000.0, "vocab_size": -1},
        shards=2),
}

TOKENIZER_TEXT = """\
Meta's Llama 2 checkpoints come as consolidated files, one for each model parallel shard.
The parameters file names the width, the number of layers and heads, and the norm epsilon.
A tokenizer model holds the pieces; the embedding has one row for every piece it holds.
Rotary position embeddings turn each pair of query and key features by an angle.
"""


def intermediate_size(params):
    dim, multiple_of = params["dim"], params["multiple_of"]
    hidden = int(params.get("ffn_dim_multiplier", 1) * int(8 * dim / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_state_dict(params, generator):
    """The full (unsharded) Meta state dict in float32, Meta's names, random weights."""
    dim, n_heads = params["dim"], params["n_heads"]
    head_dim = dim // n_heads
    kv_dim = params.get("n_kv_heads", n_heads) * head_dim
    hidden = intermediate_size(params)

    def weight(*shape):
        return WEIGHT_STD * torch.randn(shape, generator=generator)

    def norm():
        return 1.0 + 0.1 * torch.randn(dim, generator=generator)

    state = {"tok_embeddings.weight": weight(VOCAB_SIZE, dim)}
    for i in range(params["n_layers"]):
        state.update({
            f"layers.{i}.attention.wq.weight": weight(dim, dim),
            f"layers.{i}.attention.wk.weight": weight(kv_dim, dim),
            f"layers.{i}.attention.wv.weight": weight(kv_dim, dim),
            f"layers.{i}.attention.wo.weight": weight(dim, dim),
            f"layers.{i}.feed_forward.w1.weight": weight(hidden, dim),
            f"layers.{i}.feed_forward.w2.weight": weight(dim, hidden),
            f"layers.{i}.feed_forward.w3.weight": weight(hidden, dim),
            f"layers.{i}.attention_norm.weight": norm(),
            f"layers.{i}.ffn_norm.weight": norm(),
        })
    state["norm.weight"] = norm()
    state["output.weight"] = weight(VOCAB_SIZE, dim)
    theta = params.get("rope_theta", 10000.0)
    state["rope.freqs"] = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    return {name: value.to(torch.bfloat16) for name, value in state.items()}


def split_for_shard(name, value, shard, count):
    """Shard `shard` of `count` of one Meta tensor, as Meta's model-parallel training saved it."""
    if name.endswith(("norm.weight",)) or name == "rope.freqs" or count == 1:
        return value.clone()
    row_parallel = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")
    axis = 1 if name.endswith(row_parallel) else 0
    return value.chunk(count, dim=axis)[shard].clone()


def share_storage(state):
    """Make each layer's tensors views of one flat storage, as in Meta's sharded files."""
    shared, groups = {}, {}
    for name, value in state.items():
        group = name.split(".")[1] if name.startswith("layers.") else name
        groups.setdefault(group, []).append(name)
    for names in groups.values():
        flat = torch.cat([state[n].reshape(-1) for n in names])
        offset = 0
        for n in names:
            count = state[n].numel()
            shared[n] = flat[offset:offset + count].view(state[n].shape)
            offset += count
    return shared


def write_meta_case(case, spec, tokenizer_path, generator):
    directory = os.path.join(OUT, case)
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    full = meta_state_dict(spec["params"], generator)
    for shard in range(spec["shards"]):
        state = {name: split_for_shard(name, value, shard, spec["shards"]) for name, value in full.items()}
        if spec.get("shared_storage"):
            state = share_storage(state)
        torch.save(state, os.path.join(directory, f"consolidated.{shard:02d}.pth"))
    with open(os.path.join(directory, "params.json"), "w") as handle:
        json.dump(spec["params"], handle)
    shutil.copy(tokenizer_path, os.path.join(directory, "tokenizer.model"))
    return directory


def run_transformers_converter(meta_directory, output_directory, shards):
    shutil.rmtree(output_directory, ignore_errors=True)
    command = [sys.executable, "-m", "transformers.models.llama.convert_llama_weights_to_hf",
               "--input_dir", meta_directory, "--num_shards", str(shards), "--llama_version", "2",
               "--output_dir", output_directory]
    subprocess.run(command, check=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    return command


@torch.no_grad()
def store_logits(hf_directory, seed):
    model = LlamaForCausalLM.from_pretrained(hf_directory, torch_dtype=torch.float32,
                                             attn_implementation="eager")
    model.eval()
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(3, VOCAB_SIZE, size=(2, 7)).astype(np.int64)
    logits = model(torch.from_numpy(input_ids)).logits.numpy().astype(np.float32)
    np.savez(os.path.join(hf_directory, "reference.npz"), input_ids=input_ids, logits=logits)
    return model


def train_tokenizer():
    os.makedirs(WORK, exist_ok=True)
    text_path = os.path.join(WORK, "tokenizer_text.txt")
    with open(text_path, "w") as handle:
        handle.write(TOKENIZER_TEXT)
    # No byte fallback: its 256 byte pieces would make every embedding 256+ rows. Relative
    # paths, since the trainer records its input and output names inside tokenizer.model.
    cwd = os.getcwd()
    os.chdir(WORK)
    try:
        train_llama2_style_tokenizer("tokenizer_text.txt", "tokenizer", VOCAB_SIZE, byte_fallback=False)
    finally:
        os.chdir(cwd)
    destination = os.path.join(OUT, "tokenizer.model")
    shutil.copy(os.path.join(WORK, "tokenizer.model"), destination)
    return destination


def main():
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    tokenizer_path = train_tokenizer()
    generator = torch.Generator().manual_seed(0)
    manifest_cases = {}
    for seed, (case, spec) in enumerate(CASES.items()):
        meta_directory = write_meta_case(case, spec, tokenizer_path, generator)
        hf_directory = os.path.join(OUT, f"{case}-hf")
        command = run_transformers_converter(meta_directory, hf_directory, spec["shards"])
        model = store_logits(hf_directory, seed)
        manifest_cases[case] = {
            "description": spec["description"],
            "params": spec["params"],
            "shards": spec["shards"],
            "intermediate_size": intermediate_size(spec["params"]),
            "meta_files": sorted(os.listdir(meta_directory)),
            "converted_files": sorted(os.listdir(hf_directory)),
            "converter_command": " ".join(os.path.relpath(c) if os.path.exists(c) else c
                                          for c in command[1:]),
        }
        if case == "mha_1shard":
            bin_directory = os.path.join(OUT, f"{case}-hf-bin")
            shutil.rmtree(bin_directory, ignore_errors=True)
            del model.config._name_or_path  # a path on this machine, as the converter also drops
            model.to(torch.bfloat16).save_pretrained(bin_directory, safe_serialization=False)
            shutil.copy(os.path.join(hf_directory, "reference.npz"), bin_directory)
            manifest_cases[case]["pickled_copy"] = (
                f"{case}-hf-bin/: the converted model saved back in bfloat16 by "
                "save_pretrained(safe_serialization=False), Hugging Face's older pickled layout "
                f"({', '.join(sorted(os.listdir(bin_directory)))}); same logits")
    import accelerate
    import sentencepiece
    manifest = {
        "about": "Tiny random Meta-format Llama checkpoints written with torch.save in bfloat16, "
                 "Transformers' convert_llama_weights_to_hf.py output for each, and that model's "
                 "float32 logits (eager attention). Regenerate with " + SCRIPT + ".",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "accelerate": accelerate.__version__,
                     "sentencepiece": sentencepiece.__version__, "numpy": np.__version__},
        "date": datetime.date.today().isoformat(),
        "tokenizer": f"tokenizer.model: {VOCAB_SIZE}-piece sentencepiece BPE with Llama 2's trainer "
                     "settings but no byte fallback, trained on four sentences in the script; copied "
                     "into every Meta directory",
        "reference_npz": {"input_ids": "(2, 7) int64 token ids in [3, 96)",
                          "logits": "(2, 7, 96) float32 logits of Transformers' converted model "
                                    "loaded in float32 from its bfloat16 safetensors"},
        "cases": manifest_cases,
    }
    with open(os.path.join(OUT, "manifest.json"), "w") as handle:
        json.dump(manifest, handle, indent=2)
        handle.write("\n")


if __name__ == "__main__":
    main()
