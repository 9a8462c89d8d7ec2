"""Helpers shared by make_fixtures.py and make_fixtures_tp.py.

Everything here works with both pinned Transformers versions (5.23.0 and 4.45.2): it only touches
torch tensors, safetensors files, JSON and NumPy, never a version-specific Transformers API.

A fixture case is one directory under tests/data/fixtures/:

    <case>/config.json                  the checkpoint's config, as a user would find it
    <case>/model.safetensors            or model-0000k-of-0000n.safetensors + the index
    <case>/reference.npz                inputs and Transformers' outputs, keys "<call>.<field>"

and one entry in tests/data/fixtures/manifest.json describing it.
"""

import datetime
import io
import json
import os
import shutil
import zipfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.normpath(os.path.join(HERE, "..", "data", "fixtures"))
MANIFEST = os.path.join(FIXTURES, "manifest.json")

# Random weights drawn from N(0, WEIGHT_STD) give logits spread widely enough that greedy
# argmax choices are far from ties (the scripts check the margin), and attention patterns that
# are far from uniform, so a wrong mask or a wrong RoPE shows up in the numbers.
WEIGHT_STD = 0.1


def seed_everything(seed):
    """Seed torch and NumPy; every random number in a fixture comes from one of the two."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def randomize_weights(model, seed):
    """Overwrite every parameter with seeded random values.

    Transformers initialises biases to zero and RMSNorm weights to one, which would let a port
    that ignores biases or norm weights pass. Here norm weights are 1 + N(0, 0.1) and every
    other parameter (embeddings, projections, biases, score head) is N(0, WEIGHT_STD). Tied
    lm_head / embed_tokens share one parameter, so they stay tied.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            if "norm" in name:
                parameter.copy_(1.0 + 0.1 * noise)
            else:
                parameter.copy_(WEIGHT_STD * noise)


def fresh_case_directory(case):
    """Empty tests/data/fixtures/<case>/ and return its path."""
    path = os.path.join(FIXTURES, case)
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def rewrite_weights(directory, storage_dtype="float32", shards=1):
    """Re-save the float32 model.safetensors written by save_pretrained.

    Converts every tensor to `storage_dtype` (rounding to nearest, as torch's .to() does) and,
    when shards > 1, splits the tensors over that many files plus model.safetensors.index.json,
    the layout of Hugging Face's sharded checkpoints. Returns the list of files written.
    """
    source = os.path.join(directory, "model.safetensors")
    tensors = load_file(source)
    os.remove(source)
    tensors = {name: tensor.to(STORAGE_DTYPES[storage_dtype]).contiguous() for name, tensor in tensors.items()}
    metadata = {"format": "pt"}
    if shards == 1:
        save_file(tensors, source, metadata=metadata)
        return ["model.safetensors"]

    # Fill the shards in name order, starting a new one once a shard holds its share of bytes.
    names = sorted(tensors)
    total_bytes = sum(tensors[name].numel() * tensors[name].element_size() for name in names)
    per_shard = total_bytes / shards
    groups, current, current_bytes = [], [], 0
    for name in names:
        current.append(name)
        current_bytes += tensors[name].numel() * tensors[name].element_size()
        if current_bytes >= per_shard and len(groups) < shards - 1:
            groups.append(current)
            current, current_bytes = [], 0
    if current:
        groups.append(current)
    if len(groups) != shards:
        raise RuntimeError(f"could not split {len(names)} tensors into {shards} shards")

    weight_map, files = {}, []
    for index, group in enumerate(groups, start=1):
        filename = f"model-{index:05d}-of-{shards:05d}.safetensors"
        save_file({name: tensors[name] for name in group}, os.path.join(directory, filename), metadata=metadata)
        weight_map.update({name: filename for name in group})
        files.append(filename)
    index_json = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as handle:
        json.dump(index_json, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return files + ["model.safetensors.index.json"]


def read_stored_weights(directory):
    """All tensors of the checkpoint in `directory` (single file or shards), as stored."""
    tensors = {}
    for filename in sorted(os.listdir(directory)):
        if filename.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(directory, filename)))
    return tensors


def check_loaded_weights_equal_stored(model, directory):
    """Fail unless the reloaded float32 model holds exactly the stored tensors, widened.

    This is what makes the reference "computed with the weights as stored": an f16/bf16
    checkpoint is rounded once on disk, and Transformers computes with those rounded values.
    """
    stored = read_stored_weights(directory)
    state = model.state_dict()
    for name, tensor in stored.items():
        if not torch.equal(state[name], tensor.to(torch.float32)):
            raise RuntimeError(f"{directory}: {name} in the reloaded model differs from the stored tensor")
    missing = [name for name in state if name not in stored and name != "lm_head.weight"]
    if missing:
        raise RuntimeError(f"{directory}: tensors not stored: {missing}")
    if "lm_head.weight" in state and "lm_head.weight" not in stored:
        # Tied embeddings: the head must be the very same tensor as the embedding.
        if not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
            raise RuntimeError(f"{directory}: lm_head.weight is neither stored nor tied")


def edit_config(directory, edit):
    """Load config.json, pass it through `edit(dict) -> dict`, write it back (sorted keys)."""
    path = os.path.join(directory, "config.json")
    with open(path) as handle:
        config = json.load(handle)
    config = edit(config)
    with open(path, "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return config


def remove_generation_config(directory):
    """Drop generation_config.json: the tests pass every generation argument explicitly."""
    path = os.path.join(directory, "generation_config.json")
    if os.path.exists(path):
        os.remove(path)


def to_numpy(value):
    """A torch tensor, Python number or list as a NumPy array (floats stay float32)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.to(torch.float32)
        return value.numpy()
    return np.asarray(value)


def save_reference(directory, arrays):
    """Write reference.npz; keys are "<call>.<field>", values converted with to_numpy."""
    arrays = {key: to_numpy(value) for key, value in arrays.items()}
    # The same layout np.savez_compressed writes, but with a fixed timestamp on every member so
    # that regenerating unchanged data gives byte-identical files (no churn in version control).
    with zipfile.ZipFile(os.path.join(directory, "reference.npz"), "w") as archive:
        for key in sorted(arrays):
            member = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            member.compress_type = zipfile.ZIP_DEFLATED
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, arrays[key], allow_pickle=False)
            archive.writestr(member, buffer.getvalue())
    return arrays


def describe_arrays(arrays, descriptions):
    """Manifest entry for each stored array: shape, dtype and what it holds."""
    described = {}
    for key, array in sorted(arrays.items()):
        field = key.split(".", 1)[1]
        described[key] = {
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "holds": descriptions.get(key, descriptions.get(field, "")),
        }
        if not described[key]["holds"]:
            raise RuntimeError(f"no description for stored array {key}")
    return described


def update_manifest(script, versions, cases):
    """Replace this script's entries in manifest.json and keep the other script's entries."""
    manifest = {"cases": {}, "generators": {}}
    if os.path.exists(MANIFEST):
        with open(MANIFEST) as handle:
            manifest = json.load(handle)
    manifest["about"] = (
        "Tiny random-weight Llama checkpoints and the outputs Hugging Face Transformers computes "
        "for them (float32, eager attention). Regenerate with the scripts in tests/reference/ "
        "(see tests/reference/README.md). Arrays in reference.npz are named '<call>.<field>'."
    )
    manifest["tolerance"] = (
        "float32 logits, hidden states and attention weights: |ours - ref| <= 1e-4 * max(1, |ref|) "
        "elementwise; losses: the same with 1e-5; token ids identical. Only positions whose "
        "attention_mask is 1 are compared."
    )
    manifest["generators"][script] = dict(versions, date=datetime.date.today().isoformat())
    for case, entry in cases.items():
        manifest["cases"][case] = dict(entry, generator=script)
    manifest["cases"] = dict(sorted(manifest["cases"].items()))
    with open(MANIFEST, "w") as handle:
        json.dump(manifest, handle, indent=2)
        handle.write("\n")


def library_versions():
    """Versions of everything that can change the reference numbers."""
    import platform

    import safetensors
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


def directory_files(directory):
    """Sorted file names in a case directory (for the manifest)."""
    return sorted(os.listdir(directory))
