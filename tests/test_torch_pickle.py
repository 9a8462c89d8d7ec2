"""llama_np.formats.torch_pickle reads torch.save files without torch, and never runs their pickle.

The well-formed files are the ones torch.save wrote under tests/data/meta/ (Meta-format shards,
and Transformers' pytorch_model.bin). Broken and hostile files are made here: by rewriting those
zips entry by entry, or with tests/torch_files.py, which writes torch.save's format opcode by
opcode.
"""

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from llama_np import LlamaForCausalLM
from llama_np.errors import CheckpointError
from llama_np.formats.torch_pickle import ALLOWED_GLOBALS, read_torch_file
from tolerance import assert_close_to_reference
from torch_files import Tensor, bf16_bits, global_, state_dict_pickle, write_torch_file

META = Path(__file__).resolve().parent / "data" / "meta"
ONE_SHARD = META / "mha_1shard" / "consolidated.00.pth"
SHARED_STORAGE_SHARD = META / "mha_2shards" / "consolidated.00.pth"


def rewrite_zip(source: Path, target: Path, edit) -> Path:
    """Copy a zip entry by entry; edit(name, data) returns (data, compress_type) or None to drop."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            edited = edit(info.filename, old.read(info.filename))
            if edited is not None:
                data, method = edited
                new.writestr(zipfile.ZipInfo(info.filename), data, compress_type=method)
    return target


def keep(name, data):
    return data, zipfile.ZIP_STORED


# --------------------------------------------------------------------------------------------
# Files torch wrote
# --------------------------------------------------------------------------------------------


def test_reads_a_meta_shard_written_by_torch_save():
    tensors = read_torch_file(ONE_SHARD)
    assert tensors["tok_embeddings.weight"].shape == (96, 32)
    assert tensors["layers.1.feed_forward.w1.weight"].shape == (96, 32)
    assert {tensor.dtype for tensor in tensors.values()} == {"BF16"}
    assert len(tensors) == 1 + 2 * 9 + 2 + 1  # embedding, 2 layers, norm and output, rope.freqs


def test_tensors_that_view_one_storage_read_their_own_bytes():
    """In Meta's sharded files a layer's tensors are views of one storage at different offsets."""
    tensors = read_torch_file(SHARED_STORAGE_SHARD)
    wq, wk = tensors["layers.0.attention.wq.weight"], tensors["layers.0.attention.wk.weight"]
    assert wq.file == wk.file and wk._start == wq._stop  # consecutive views of one storage
    with zipfile.ZipFile(SHARED_STORAGE_SHARD) as archive:
        storages = [n for n in archive.namelist() if "/data/" in n]
    assert len(storages) < len(tensors)  # fewer storages than tensors: they are shared


def test_a_read_tensor_is_a_view_of_the_files_memory_mapping():
    stored = read_torch_file(ONE_SHARD)["layers.0.attention.wq.weight"].stored()
    assert not stored.flags.owndata and not stored.flags.writeable


def test_our_test_writer_round_trips_every_float_dtype(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((3, 5)).astype(np.float32)
    tensors = {
        "f32": Tensor("F32", (3, 5), values.astype("<f4").tobytes()),
        "f16": Tensor("F16", (3, 5), values.astype("<f2").tobytes()),
        "bf16": Tensor("BF16", (3, 5), bf16_bits(values)),
        "f64": Tensor("F64", (3, 5), values.astype("<f8").tobytes()),
        "empty": Tensor("F32", (0, 4), b""),
    }
    write_torch_file(tmp_path / "w.pth", tensors)
    read = read_torch_file(tmp_path / "w.pth")
    np.testing.assert_array_equal(read["f32"].numpy(), values)
    np.testing.assert_array_equal(read["f16"].numpy(), values.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(read["bf16"].numpy(), values, rtol=2**-8)
    np.testing.assert_array_equal(read["f64"].numpy(np.float64), values.astype(np.float64))
    assert read["empty"].numpy().shape == (0, 4)


def test_a_pickled_hugging_face_directory_loads_and_matches_transformers():
    directory = META / "mha_1shard-hf-bin"
    model = LlamaForCausalLM.from_pretrained(directory)
    assert "pickled" in model.checkpoint.layout
    reference = np.load(directory / "reference.npz")
    assert_close_to_reference(model(reference["input_ids"]).logits, reference["logits"],
                              "logits from pytorch_model.bin")


def test_a_sharded_pickled_directory_loads_through_its_index(tmp_path):
    directory = META / "mha_1shard-hf-bin"
    tensors = read_torch_file(directory / "pytorch_model.bin")
    names = sorted(tensors)
    halves = {"pytorch_model-00001-of-00002.bin": names[:10], "pytorch_model-00002-of-00002.bin": names[10:]}
    for file_name, part in halves.items():
        write_torch_file(tmp_path / file_name, {
            name: Tensor(tensors[name].dtype, tensors[name].shape, tensors[name].stored().tobytes())
            for name in part})
    weight_map = {name: file_name for file_name, part in halves.items() for name in part}
    (tmp_path / "pytorch_model.bin.index.json").write_text(f'{{"weight_map": {weight_map!r}}}'.replace("'", '"'))
    (tmp_path / "config.json").write_bytes((directory / "config.json").read_bytes())
    reference = np.load(directory / "reference.npz")
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    assert len(model.checkpoint.files) == 2
    assert_close_to_reference(model(reference["input_ids"]).logits, reference["logits"],
                              "logits from two pytorch_model shards")


# --------------------------------------------------------------------------------------------
# Hostile pickles: code must never run
# --------------------------------------------------------------------------------------------


class CreatesAFile:
    """Unpickling this runs open(path, "w"): the simplest visible side effect."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_that_would_create_a_file_is_refused_and_creates_nothing(tmp_path):
    marker = tmp_path / "created-by-the-pickle"
    payload = pickle.dumps({"w": CreatesAFile(marker)}, protocol=2)

    # The payload really is hostile: plain pickle creates the file.
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()

    write_torch_file(tmp_path / "consolidated.00.pth", {}, pickle_bytes=payload)
    with pytest.raises(CheckpointError) as error:
        read_torch_file(tmp_path / "consolidated.00.pth")
    assert not marker.exists()
    message = str(error.value)
    assert "io.open" in message and "not imported or run" in message, message
    assert "consolidated.00.pth" in message


@pytest.mark.parametrize("module, name", [("os", "system"), ("builtins", "eval"),
                                          ("torch._utils", "_rebuild_tensor"),
                                          ("numpy.core.multiarray", "_reconstruct"),
                                          ("torch", "load")])
def test_every_global_outside_the_allowlist_is_refused_by_name(tmp_path, module, name):
    payload = b"\x80\x02" + global_(module, name) + b")R."  # call it with no arguments
    write_torch_file(tmp_path / "w.pth", {}, pickle_bytes=payload)
    with pytest.raises(CheckpointError, match=f"names the global {module}.{name},"):
        read_torch_file(tmp_path / "w.pth")


def test_stack_global_names_go_through_the_same_allowlist(tmp_path):
    payload = pickle.dumps({"w": CreatesAFile(tmp_path / "x")}, protocol=4)  # STACK_GLOBAL
    write_torch_file(tmp_path / "w.pth", {}, pickle_bytes=payload)
    with pytest.raises(CheckpointError, match="io.open"):
        read_torch_file(tmp_path / "w.pth")
    assert not (tmp_path / "x").exists()


def test_the_allowlist_is_only_tensor_rebuilding_storages_and_ordered_dict():
    modules = {name.rsplit(".", 1)[0] for name in ALLOWED_GLOBALS}
    assert modules == {"torch", "torch._utils", "collections"}
    assert all(callable(v) or type(v).__name__ == "StorageType" for v in ALLOWED_GLOBALS.values())
    assert all(getattr(v, "__module__", "llama_np.formats.torch_pickle") == "llama_np.formats.torch_pickle"
               for v in ALLOWED_GLOBALS.values())  # our stand-ins, never torch's functions


@pytest.mark.parametrize("payload, expected", [
    (pickle.dumps({1, 2}, protocol=2), "opcode|global"),  # a set: builtins.set
    (pickle.dumps({"w": [1, 2]}, protocol=2), "maps 'w' to a list"),
    (pickle.dumps([1, 2], protocol=2), "pickled list"),
    (b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01", "not a valid pickle"),  # truncated
    (b"\x80\x02h\x05.", "never stored"),  # BINGET of an empty memo
    (b"\x80\x02N)R.", "not callable here"),  # calling None with ()
])
def test_malformed_or_foreign_pickles_are_refused(tmp_path, payload, expected):
    write_torch_file(tmp_path / "w.pth", {}, pickle_bytes=payload)
    with pytest.raises(CheckpointError, match=expected):
        read_torch_file(tmp_path / "w.pth")


def test_a_value_nested_100_000_deep_is_described_not_repred(tmp_path):
    payload = b"\x80\x02N" + b"\x85" * 100_000 + b"Q."  # (((None,),),...) as a persistent id
    write_torch_file(tmp_path / "w.pth", {}, pickle_bytes=payload)
    with pytest.raises(CheckpointError, match=r"a persistent id is \(tuple\)"):
        read_torch_file(tmp_path / "w.pth")


def test_a_pickle_running_too_many_opcodes_is_refused(tmp_path, monkeypatch):
    from llama_np.formats import torch_pickle

    monkeypatch.setattr(torch_pickle, "MAX_PICKLE_OPERATIONS", 50)
    with pytest.raises(CheckpointError, match="more than 50 opcodes"):
        read_torch_file(ONE_SHARD)


# --------------------------------------------------------------------------------------------
# Broken zips and storages
# --------------------------------------------------------------------------------------------


def test_a_compressed_storage_entry_is_refused(tmp_path):
    compressed = rewrite_zip(ONE_SHARD, tmp_path / "c.pth", lambda name, data: (
        data, zipfile.ZIP_DEFLATED if "/data/" in name else zipfile.ZIP_STORED))
    with pytest.raises(CheckpointError, match="is compressed"):
        read_torch_file(compressed)


def test_a_truncated_storage_is_refused(tmp_path):
    def shorten(name, data):
        return (data[:-2] if name.endswith("/data/0") else data), zipfile.ZIP_STORED

    with pytest.raises(CheckpointError, match="truncated or corrupt") as error:
        read_torch_file(rewrite_zip(ONE_SHARD, tmp_path / "t.pth", shorten))
    assert "data/0" in str(error.value)


def test_a_missing_storage_is_refused(tmp_path):
    dropped = rewrite_zip(ONE_SHARD, tmp_path / "m.pth",
                          lambda name, data: None if name.endswith("/data/3") else keep(name, data))
    with pytest.raises(CheckpointError, match="has no .*data/3.*incomplete"):
        read_torch_file(dropped)


def test_every_truncation_of_a_file_is_one_clear_error(tmp_path):
    data = ONE_SHARD.read_bytes()
    for length in range(0, len(data), 1999):
        path = tmp_path / "cut.pth"
        path.write_bytes(data[:length])
        with pytest.raises(CheckpointError):
            read_torch_file(path)


def test_random_damage_to_the_pickle_is_a_checkpoint_error_or_a_valid_read(tmp_path):
    """Flipped bytes in data.pkl: never another exception, and never code."""
    with zipfile.ZipFile(ONE_SHARD) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        original = archive.read(name)
    rng = np.random.default_rng(0)
    outcomes = {"refused": 0, "read": 0}
    for _ in range(150):
        damaged = bytearray(original)
        for position in rng.integers(0, len(damaged), size=3):
            damaged[position] = rng.integers(0, 256)
        path = rewrite_zip(ONE_SHARD, tmp_path / "d.pth", lambda n, d: (
            bytes(damaged) if n == name else d, zipfile.ZIP_STORED))
        try:
            read_torch_file(path)
            outcomes["read"] += 1
        except CheckpointError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0, outcomes


def test_random_damage_anywhere_in_the_file_is_a_checkpoint_error_or_a_valid_read(tmp_path):
    """Flipped bytes in the pickle, the entries or the zip directory at the end."""
    original = SHARED_STORAGE_SHARD.read_bytes()
    rng = np.random.default_rng(1)
    refused = 0
    for trial in range(600):
        damaged = bytearray(original)
        start = (0, len(original) - 1500, 0)[trial % 3]
        stop = (len(original), len(original), 1200)[trial % 3]
        for position in rng.integers(start, stop, size=rng.integers(1, 6)):
            damaged[position] = rng.integers(0, 256)
        path = tmp_path / "d.pth"
        path.write_bytes(bytes(damaged))
        try:
            for tensor in read_torch_file(path).values():
                tensor.numpy()
        except CheckpointError:
            refused += 1
    assert refused > 100


def test_the_legacy_format_and_other_files_are_named(tmp_path):
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointError, match="legacy format"):
        read_torch_file(legacy)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a zip archive"):
        read_torch_file(text)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_torch_file(tmp_path / "absent.pth")


def test_a_zip_without_a_pickle_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "z.pth", "w") as archive:
        archive.writestr("archive/data/0", b"1234")
    with pytest.raises(CheckpointError, match="one <name>/data.pkl"):
        read_torch_file(tmp_path / "z.pth")


def test_big_endian_files_are_refused(tmp_path):
    write_torch_file(tmp_path / "b.pth", {"w": Tensor("F32", (2,), bytes(8))}, byteorder=b"big")
    with pytest.raises(CheckpointError, match="'big' byte order"):
        read_torch_file(tmp_path / "b.pth")


def test_integer_tensors_are_refused_by_name(tmp_path):
    write_torch_file(tmp_path / "i.pth", {"steps": Tensor("I64", (1,), bytes(8))})
    with pytest.raises(CheckpointError, match="'steps' .* torch.LongStorage; llama_np reads float"):
        read_torch_file(tmp_path / "i.pth")


def _pickle_with(tmp_path, offset, shape, stride, numel, dtype="F32"):
    from torch_files import state_dict_pickle

    payload = state_dict_pickle({"w": (dtype, "0", numel, offset, shape, stride)})
    path = tmp_path / "v.pth"
    write_torch_file(path, {"w": Tensor(dtype, (numel,), bytes(4 * numel))}, pickle_bytes=payload)
    return path


def test_a_tensor_reaching_past_its_storage_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="reads elements 2 to 8 of storage 0, which has 6"):
        read_torch_file(_pickle_with(tmp_path, offset=2, shape=(2, 3), stride=(3, 1), numel=6))


def test_a_storage_smaller_than_the_pickle_says_is_refused(tmp_path):
    from torch_files import state_dict_pickle

    payload = state_dict_pickle({"w": ("F32", "0", 100, 0, (4,), (1,))})
    write_torch_file(tmp_path / "s.pth", {"w": Tensor("F32", (4,), bytes(16))}, pickle_bytes=payload)
    with pytest.raises(CheckpointError, match="holds 16 bytes, but the pickle says 100 elements"):
        read_torch_file(tmp_path / "s.pth")


def test_a_non_contiguous_view_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="non-contiguous"):
        read_torch_file(_pickle_with(tmp_path, offset=0, shape=(3, 2), stride=(1, 3), numel=6))


def test_a_huge_shape_is_refused_before_anything_is_allocated(tmp_path):
    with pytest.raises(CheckpointError, match="beyond the"):
        read_torch_file(_pickle_with(tmp_path, offset=0, shape=(2**30, 2**30), stride=(2**30, 1), numel=6))


def test_a_negative_or_malformed_shape_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="size"):
        read_torch_file(_pickle_with(tmp_path, offset=0, shape=(-1, 6), stride=(6, 1), numel=6))


def test_an_oversized_pickle_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from llama_np.formats import torch_pickle

    monkeypatch.setattr(torch_pickle, "MAX_PICKLE_BYTES", 100)
    with pytest.raises(CheckpointError, match="more than the 100-byte limit"):
        read_torch_file(ONE_SHARD)


@pytest.mark.parametrize("dimensions", [9, 40_000, 900_000])
def test_a_shape_of_a_million_dimensions_is_refused_before_any_arithmetic(tmp_path, dimensions):
    # 900,000 dimensions of 2: their product has 270,000 digits, which took an hour to multiply
    # out before the rank was checked.
    shape = (2,) * dimensions
    payload = state_dict_pickle({"w": ("F32", "0", 4, 0, shape, shape)})
    write_torch_file(tmp_path / "w.pth", {}, pickle_bytes=payload)
    with pytest.raises(CheckpointError, match=rf"size of {dimensions:,} dimensions; a weight has at most 8"):
        read_torch_file(tmp_path / "w.pth")


@pytest.mark.parametrize("dimension", [2**41, 10**400])
def test_a_dimension_beyond_any_weight_is_refused(tmp_path, dimension):
    payload = state_dict_pickle({"w": ("F32", "0", 4, 0, (dimension, 1), (1, 1))})
    write_torch_file(tmp_path / "w.pth", {"x": Tensor("F32", (1,), bytes(4), storage="0")}, pickle_bytes=payload)
    with pytest.raises(CheckpointError, match="beyond the 8 dimensions and"):
        read_torch_file(tmp_path / "w.pth")


def test_a_fifo_named_like_a_shard_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth is a FIFO \(named pipe\); llama_np reads regular files only"):
        read_torch_file(tmp_path / "consolidated.00.pth")


def test_a_storage_whose_local_header_names_another_entry_is_refused(tmp_path):
    path = tmp_path / "w.pth"
    write_torch_file(path, {"w": Tensor("F32", (2,), np.array([1.0, 2.0], np.float32).tobytes())})
    data = bytearray(path.read_bytes())
    local = data.index(b"archive/data/0")  # the first occurrence is the entry's local header
    data[local:local + len(b"archive/data/0")] = b"archive/data/9"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="calls itself b'archive/data/9'"):
        read_torch_file(path)
