"""Tests for llama_np.formats.safetensors: safetensors headers, memory-mapped tensors, shards, writing.

Broken files are crafted byte by byte so that each header check is exercised on its own.
"""

import errno
import json
import mmap
import os
import re
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from llama_np import LlamaConfig, LlamaForCausalLM
from llama_np.formats import files, locate, safetensors
from llama_np.formats.safetensors import Checkpoint, read_safetensors_header, save_safetensors
from llama_np.formats.locate import bundled_model_names, resolve_model_path
from llama_np.weights.codecs import CODECS, float32_to_bf16_bits
from llama_np.errors import CheckpointError, ConfigError


def write_raw(path, header, data=b"", header_length=None):
    """Write a safetensors-like file by hand: header is a dict (JSON-encoded here) or raw bytes."""
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(header_bytes) if header_length is None else header_length
    path.write_bytes(struct.pack("<Q", length) + header_bytes + data)
    return path


def entry(shape, begin, end, dtype="F32"):
    """One header entry: {"dtype", "shape", "data_offsets"}."""
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


DATA = Path(__file__).resolve().parent / "data"
HAS_FLOCK = sys.platform != "win32"
if HAS_FLOCK:
    import fcntl


def random_float32(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


def test_f32_round_trip_is_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    weights = {
        "model.embed_tokens.weight": random_float32(rng, (7, 5)),
        "model.norm.weight": random_float32(rng, (5,)),
    }
    save_safetensors(tmp_path / "model.safetensors", weights)

    loaded = Checkpoint.open(tmp_path)

    assert loaded.storage_dtypes == {"F32"}
    assert loaded["model.embed_tokens.weight"].shape == (7, 5)
    for name, array in weights.items():
        np.testing.assert_array_equal(loaded[name].numpy(), array)
        assert loaded[name].numpy().dtype == np.float32


def test_f16_round_trip_is_exact_in_float32_and_float64(tmp_path):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((4, 6)).astype(np.float16)
    save_safetensors(tmp_path / "model.safetensors", {"w": weight})

    stored = Checkpoint.open(tmp_path)["w"]

    assert stored.dtype == "F16"
    assert stored.nbytes == weight.size * 2
    np.testing.assert_array_equal(stored.numpy(np.float32), weight.astype(np.float32))
    np.testing.assert_array_equal(stored.numpy(np.float64), weight.astype(np.float64))
    assert stored.numpy(np.float64).dtype == np.float64


def test_bf16_widening_is_exact_against_truncated_float32_bits(tmp_path):
    rng = np.random.default_rng(2)
    raw_bits = random_float32(rng, (3, 8)).view(np.uint32)
    # Zeroing the low 16 bits gives values bf16 holds exactly, so storing them must not round.
    representable = (raw_bits & np.uint32(0xFFFF0000)).view(np.float32)
    expected_pattern = (representable.view(np.uint32) >> 16).astype(np.uint16)
    save_safetensors(tmp_path / "model.safetensors", {"w": representable}, bf16=True)

    stored = Checkpoint.open(tmp_path)["w"]

    assert stored.dtype == "BF16"
    assert stored.nbytes == representable.size * 2
    np.testing.assert_array_equal(stored.stored(), expected_pattern)
    np.testing.assert_array_equal(stored.numpy(np.float32), representable)
    np.testing.assert_array_equal(stored.numpy(np.float64), representable.astype(np.float64))


def test_bf16_rounding_is_to_nearest_even():
    one_ulp = 2.0**-7  # bf16 spacing just above 1.0
    values = np.array(
        [
            1 + one_ulp / 2,  # halfway, 1.0 has an even mantissa: down
            1 + 3 * one_ulp / 2,  # halfway, 1 + ulp is odd: up to 1 + 2 ulp
            1 + one_ulp / 2 + 2.0**-20,  # just above halfway: up
            -(1 + one_ulp / 2 - 2.0**-20),  # just below halfway: down (in magnitude)
        ],
        dtype=np.float32,
    )
    expected = np.array([1.0, 1 + 2 * one_ulp, 1 + one_ulp, -1.0], dtype=np.float32)

    widened = (float32_to_bf16_bits(values).astype(np.uint32) << 16).view(np.float32)

    np.testing.assert_array_equal(widened, expected)
    nan_bits = float32_to_bf16_bits(np.array([np.nan, -np.inf], dtype=np.float32))
    assert np.isnan((nan_bits[:1].astype(np.uint32) << 16).view(np.float32)[0])
    assert nan_bits[1] == 0xFF80


def test_files_written_by_the_safetensors_package_read_back(tmp_path):
    rng = np.random.default_rng(3)
    weights = {"a": random_float32(rng, (3, 2)), "b": rng.standard_normal(5).astype(np.float16)}
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "np"})

    tensors, metadata = read_safetensors_header(tmp_path / "model.safetensors")
    loaded = Checkpoint.open(tmp_path)

    assert metadata == {"format": "np"}
    assert {name: info.dtype for name, info in tensors.items()} == {"a": "F32", "b": "F16"}
    for name, array in weights.items():
        np.testing.assert_array_equal(loaded[name].numpy(), array.astype(np.float32))


def test_files_we_write_load_in_the_safetensors_package(tmp_path):
    rng = np.random.default_rng(4)
    weights = {
        "f64": rng.standard_normal((2, 2)),
        "f32": random_float32(rng, (3,)),
        "f16": rng.standard_normal((1, 3)).astype(np.float16),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    save_safetensors(tmp_path / "x.safetensors", weights, metadata={"format": "pt"})

    loaded = load_file(str(tmp_path / "x.safetensors"))

    assert loaded.keys() == weights.keys()
    for name, array in weights.items():
        assert loaded[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded[name], array)
    assert read_safetensors_header(tmp_path / "x.safetensors")[1] == {"format": "pt"}


def test_f32_numpy_is_a_read_only_view_of_the_mapping_not_a_copy(tmp_path):
    save_safetensors(tmp_path / "model.safetensors", {"w": np.ones((4, 4), dtype=np.float32)})
    stored = Checkpoint.open(tmp_path)["w"]

    first, second = stored.numpy(np.float32), stored.numpy(np.float32)

    assert np.shares_memory(first, second)  # both views of the one mapping
    assert not first.flags.writeable
    assert not first.flags.owndata
    widened = stored.numpy(np.float64)
    assert not np.shares_memory(widened, first)


def test_each_file_is_mapped_once_for_all_its_tensors(tmp_path, monkeypatch):
    weights = {f"t{i}": np.full(3, i, dtype=np.float32) for i in range(4)}
    save_safetensors(tmp_path / "model.safetensors", weights)
    calls = []
    real_mmap = mmap.mmap

    def counting_mmap(*args, **kwargs):
        calls.append(args)
        return real_mmap(*args, **kwargs)

    monkeypatch.setattr(safetensors.mmap, "mmap", counting_mmap)
    loaded = Checkpoint.open(tmp_path)
    assert calls == []  # opening reads headers only

    for i in range(4):
        np.testing.assert_array_equal(loaded[f"t{i}"].numpy(), np.full(3, i, dtype=np.float32))

    assert len(calls) == 1


def test_zero_size_tensor_reads_as_empty_array(tmp_path):
    save_safetensors(tmp_path / "model.safetensors", {"e": np.zeros((0, 3), dtype=np.float16)})

    array = Checkpoint.open(tmp_path)["e"].numpy()

    assert array.shape == (0, 3)
    assert array.dtype == np.float32


def test_numpy_rejects_a_compute_dtype_other_than_float32_or_float64(tmp_path):
    save_safetensors(tmp_path / "model.safetensors", {"w": np.ones(2, dtype=np.float32)})
    with pytest.raises(CheckpointError, match="float32 or float64"):
        Checkpoint.open(tmp_path)["w"].numpy(np.float16)


def test_checkpoint_summary_properties(tmp_path):
    save_safetensors(
        tmp_path / "model.safetensors",
        {"a": np.ones((2, 3), dtype=np.float32), "b": np.ones(4, dtype=np.float16)},
    )
    loaded = Checkpoint.open(tmp_path)

    assert loaded.nbytes == 2 * 3 * 4 + 4 * 2
    assert loaded.storage_dtypes == {"F32", "F16"}
    assert loaded.files == [tmp_path / "model.safetensors"]
    assert "a" in loaded and "c" not in loaded
    assert sorted(loaded) == ["a", "b"] and len(loaded) == 2


def test_unknown_tensor_name_suggests_close_names(tmp_path):
    save_safetensors(tmp_path / "model.safetensors", {"model.norm.weight": np.ones(2, np.float32)})
    with pytest.raises(CheckpointError, match="did you mean model.norm.weight"):
        Checkpoint.open(tmp_path)["model.norm.weights"]


def test_a_single_safetensors_file_can_be_opened_by_path(tmp_path):
    save_safetensors(tmp_path / "adapter.safetensors", {"w": np.arange(3, dtype=np.float32)})
    np.testing.assert_array_equal(
        Checkpoint.open(tmp_path / "adapter.safetensors")["w"].numpy(), [0, 1, 2]
    )


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------


def write_sharded(directory, shards):
    """shards: {file name: {tensor name: array}}; writes the shards and the index."""
    weight_map = {}
    for file_name, tensors in shards.items():
        save_safetensors(directory / file_name, tensors)
        weight_map.update({name: file_name for name in tensors})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_checkpoint_reads_every_tensor_from_its_shard(tmp_path):
    first = {"model.embed_tokens.weight": np.arange(6, dtype=np.float32).reshape(3, 2)}
    second = {"model.norm.weight": np.array([1.5, -2.0], dtype=np.float16),
              "lm_head.weight": np.full((3, 2), 0.25, dtype=np.float32)}
    write_sharded(tmp_path, {"model-00001-of-00002.safetensors": first,
                             "model-00002-of-00002.safetensors": second})

    loaded = Checkpoint.open(tmp_path)

    assert len(loaded.files) == 2
    assert loaded.storage_dtypes == {"F32", "F16"}
    assert loaded["model.norm.weight"].file.name == "model-00002-of-00002.safetensors"
    for name, array in {**first, **second}.items():
        np.testing.assert_array_equal(loaded[name].numpy(), array.astype(np.float32))


def test_index_naming_a_missing_shard_is_an_error(tmp_path):
    write_sharded(tmp_path, {"model-00001-of-00002.safetensors": {"a": np.ones(2, np.float32)}})
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))

    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        Checkpoint.open(tmp_path)


def test_index_placing_a_tensor_in_the_wrong_shard_is_an_error(tmp_path):
    write_sharded(tmp_path, {"s1.safetensors": {"a": np.ones(2, np.float32)},
                             "s2.safetensors": {"b": np.ones(2, np.float32)}})
    index = {"weight_map": {"a": "s2.safetensors", "b": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))

    with pytest.raises(CheckpointError, match=r"places these tensors in s2\.safetensors.*: a"):
        Checkpoint.open(tmp_path)


@pytest.mark.parametrize(
    "index_text",
    ["{not json", json.dumps([1, 2]), json.dumps({"metadata": {}}),
     json.dumps({"weight_map": {"a": 3}})],
)
def test_index_that_is_not_json_with_a_weight_map_is_an_error(tmp_path, index_text):
    (tmp_path / "model.safetensors.index.json").write_text(index_text)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        Checkpoint.open(tmp_path)


def test_index_cannot_point_outside_its_directory(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="outside"):
        Checkpoint.open(tmp_path)


# --------------------------------------------------------------------------------------------
# Corrupt headers
# --------------------------------------------------------------------------------------------


def test_file_shorter_than_the_length_field(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    with pytest.raises(CheckpointError, match=r"is 3 bytes long.*8-byte header length") as error:
        read_safetensors_header(path)
    assert str(path) in str(error.value)


def test_file_cut_inside_the_header(tmp_path):
    path = tmp_path / "model.safetensors"
    save_safetensors(path, {"w": np.ones((8, 8), dtype=np.float32)})
    path.write_bytes(path.read_bytes()[:20])

    with pytest.raises(CheckpointError, match="truncated") as error:
        Checkpoint.open(tmp_path)
    assert str(path) in str(error.value)


def test_file_cut_inside_the_data(tmp_path):
    path = tmp_path / "model.safetensors"
    save_safetensors(path, {"w": np.ones((8, 8), dtype=np.float32)})
    path.write_bytes(path.read_bytes()[:-10])

    with pytest.raises(CheckpointError, match=r"'w'.*outside the data section of 246 bytes"):
        Checkpoint.open(tmp_path)


def test_header_length_past_the_end_of_file(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {}, header_length=1000)
    with pytest.raises(CheckpointError, match="declares a 1000-byte header but the file is only"):
        read_safetensors_header(path)


def test_absurd_header_length_is_rejected_before_reading(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {}, header_length=2**62)
    with pytest.raises(CheckpointError, match="more than the"):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    "header, expected",
    [
        (b"{not json}", "not valid JSON"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"[1, 2, 3]", "JSON list; expected an object"),
        (b'{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "a": {}}', "twice"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON.*recursion"),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "not valid JSON.*recursion"),
    ],
)
def test_header_that_is_not_a_json_object(tmp_path, header, expected):
    path = write_raw(tmp_path / "x.safetensors", header, data=b"\0" * 4)
    with pytest.raises(CheckpointError, match=expected) as error:
        read_safetensors_header(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("dtype", ["I8", "U8", "F8_E4M3", "I64", "float32", ["F32"], {"F32": 1}, None])
def test_unknown_dtype_names_tensor_and_dtype(tmp_path, dtype):
    path = write_raw(tmp_path / "x.safetensors", {"q.weight": entry((4,), 0, 4, dtype)},
                     data=b"\0" * 4)
    with pytest.raises(CheckpointError, match=rf"'q.weight'.*dtype {re.escape(repr(dtype))}"):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    "entry",
    [[1, 2], "F32", {"dtype": "F32", "shape": [1]}, {"shape": [1], "data_offsets": [0, 4]}],
)
def test_entry_without_dtype_shape_and_offsets(tmp_path, entry):
    path = write_raw(tmp_path / "x.safetensors", {"w": entry}, data=b"\0" * 4)
    with pytest.raises(CheckpointError, match="expected an object with dtype, shape and data_"):
        read_safetensors_header(path)


@pytest.mark.parametrize("shape", [[-1], [2.0], "4", [True], None])
def test_shape_must_be_a_list_of_non_negative_ints(tmp_path, shape):
    header = {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}
    path = write_raw(tmp_path / "x.safetensors", header, data=b"\0" * 4)
    with pytest.raises(CheckpointError, match="list of non-negative ints"):
        read_safetensors_header(path)


@pytest.mark.parametrize("offsets", [[0], [0, 4, 8], [0.0, 4], "0-4", [False, 4]])
def test_data_offsets_must_be_two_ints(tmp_path, offsets):
    header = {"w": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}
    path = write_raw(tmp_path / "x.safetensors", header, data=b"\0" * 4)
    with pytest.raises(CheckpointError, match="expected two ints"):
        read_safetensors_header(path)


@pytest.mark.parametrize("offsets", [[4, 8], [-4, 0], [4, 0], [0, 8]])
def test_offsets_outside_the_data_section(tmp_path, offsets):
    header = {"w": entry((1,), *offsets)}
    path = write_raw(tmp_path / "x.safetensors", header, data=b"\0" * 4)
    with pytest.raises(CheckpointError, match="outside the data section of 4 bytes"):
        read_safetensors_header(path)


def test_overlapping_byte_ranges(tmp_path):
    header = {"a": entry((2,), 0, 8), "b": entry((4,), 8, 24), "c": entry((2,), 20, 28)}
    path = write_raw(tmp_path / "x.safetensors", header, data=b"\0" * 28)
    with pytest.raises(CheckpointError, match="'b' and 'c'.*overlap"):
        read_safetensors_header(path)


def test_range_inside_another_is_an_overlap(tmp_path):
    header = {"outer": entry((4,), 0, 16), "inner": entry((1,), 4, 8),
              "after": entry((1,), 16, 20)}
    path = write_raw(tmp_path / "x.safetensors", header, data=b"\0" * 20)
    with pytest.raises(CheckpointError, match="'outer' and 'inner'.*overlap"):
        read_safetensors_header(path)


def test_shape_times_itemsize_must_equal_the_byte_range(tmp_path):
    header = {"w": entry((2, 3), 0, 12, dtype="F16")}  # 2*3*2 = 12 bytes: valid
    path = write_raw(tmp_path / "ok.safetensors", header, data=b"\0" * 12)
    assert read_safetensors_header(path)[0]["w"].shape == (2, 3)

    header = {"w": entry((2, 3), 0, 16, dtype="F16")}
    path = write_raw(tmp_path / "x.safetensors", header, data=b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"shape \(2, 3\) of F16 \(12 bytes\).*hold 16"):
        read_safetensors_header(path)


def test_metadata_must_map_strings_to_strings(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {"__metadata__": {"format": 1}})
    with pytest.raises(CheckpointError, match="__metadata__"):
        read_safetensors_header(path)


def test_header_offsets_are_absolute_positions_in_the_file(tmp_path):
    header = {"__metadata__": {"k": "v"}, "a": entry((1,), 4, 8), "b": entry((1,), 0, 4)}
    path = write_raw(tmp_path / "x.safetensors", header,
                     data=np.array([2.0, 3.0], dtype="<f4").tobytes())
    header_length = len(json.dumps(header).encode())

    tensors, metadata = read_safetensors_header(path)

    assert metadata == {"k": "v"}
    assert (tensors["a"].start, tensors["a"].stop) == (8 + header_length + 4, 8 + header_length + 8)
    np.testing.assert_array_equal(Checkpoint.open(path)["a"].numpy(), [3.0])


def test_file_that_changed_after_opening_is_not_mapped(tmp_path):
    path = tmp_path / "model.safetensors"
    save_safetensors(path, {"w": np.ones(16, dtype=np.float32)})
    loaded = Checkpoint.open(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 32)

    with pytest.raises(CheckpointError, match="changed since it was opened: its size went from"):
        loaded["w"].numpy()


def run_python(code: str, *args) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter: a SIGBUS there fails the test instead of killing pytest."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_reading_an_f32_tensor_of_a_file_that_shrank_after_mapping_is_an_error_not_sigbus(tmp_path):
    save_safetensors(tmp_path / "model.safetensors", {"w": np.ones(1 << 16, dtype=np.float32)})
    result = run_python("""
        import os, sys
        from llama_np import CheckpointError
        from llama_np.formats.safetensors import Checkpoint
        loaded = Checkpoint.open(sys.argv[1])
        assert loaded["w"].numpy().sum() == 1 << 16          # mapped, and every page read once
        os.truncate(loaded.files[0], 4096)                   # shrinks under the mapping
        for check in (lambda: loaded["w"].numpy().sum(), lambda: loaded["w"].stored().sum(),
                      loaded.check_unchanged):
            try:
                check()
            except CheckpointError as error:
                print(error)
            else:
                print("no error")
        """, tmp_path)

    assert result.returncode == 0, f"exit {result.returncode} (-7 is SIGBUS): {result.stderr}"
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all("changed since it was opened: its size went from" in line
                                   and str(tmp_path / "model.safetensors") in line
                                   for line in lines), result.stdout


# Kept F32 weights are views of the mapping, so the model must ask the checkpoint before reusing
# them; widened-per-use weights are read again, and each read checks the file.
@pytest.mark.parametrize("keep_widened", [False, True])
def test_model_refuses_a_checkpoint_that_shrank_between_calls(tmp_path, keep_widened):
    result = run_python(f"""
        import os, sys
        import numpy as np
        from llama_np import CheckpointError, LlamaConfig, LlamaForCausalLM
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4)
        LlamaForCausalLM.from_config(config).save_pretrained(sys.argv[1])
        model = LlamaForCausalLM.from_pretrained(sys.argv[1], keep_widened={keep_widened})
        model(np.arange(5)[None])
        path = os.path.join(sys.argv[1], "model.safetensors")
        os.truncate(path, os.path.getsize(path) // 2)
        try:
            model(np.arange(5)[None])
        except CheckpointError as error:
            print(error)
        """, tmp_path)

    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    assert "model.safetensors changed since it was opened" in result.stdout


# One memory-mapped reader of each format: safetensors shards of BF16 (streamed, read again in
# every forward), a GGUF file of Q4_0 blocks, Meta's consolidated.00.pth. A file renamed over the
# one the model uses (a re-download) is refused too: the model's header and tensors are the old
# file's, and it would otherwise serve the old weights without a word (docs/checkpoints.md).
@pytest.mark.parametrize("change", ["truncated", "replaced"])
@pytest.mark.parametrize("source", ["fixtures/mha_bf16_sharded_4x", "gguf/gqa_f32-Q4_0.gguf",
                                    "meta/mha_1shard"])
def test_a_forward_after_a_weights_file_changed_on_disk_is_an_error_naming_it_not_sigbus(
        tmp_path, source, change):
    result = run_python("""
        import os, shutil, sys
        import numpy as np
        from llama_np import CheckpointError, LlamaForCausalLM
        source, copy, change = sys.argv[1:]
        (shutil.copytree if os.path.isdir(source) else shutil.copy)(source, copy)
        model = LlamaForCausalLM.from_pretrained(copy, keep_widened=False)
        model(np.arange(5)[None])                             # every file mapped and read
        path = str(model.weights.checkpoint.files[-1])
        print(path)
        if change == "truncated":
            os.truncate(path, os.path.getsize(path) // 2)
        else:
            shutil.copy(path, path + ".new")
            os.replace(path + ".new", path)
        try:
            model(np.arange(5)[None])
        except CheckpointError as error:
            print(error)
        """, DATA / source, tmp_path / Path(source).name, change)

    assert result.returncode == 0, f"exit {result.returncode} (-7 is SIGBUS): {result.stderr}"
    path, message = result.stdout.splitlines()
    expected = {"truncated": "its size went from", "replaced": "another file has replaced it"}[change]
    assert message.startswith(f"{path} changed since it was opened: {expected}"), message


def test_check_unchanged_notices_a_file_replaced_or_rewritten_in_place(tmp_path):
    path = tmp_path / "model.safetensors"
    save_safetensors(path, {"w": np.ones(4, dtype=np.float32)})
    loaded = Checkpoint.open(tmp_path)
    loaded.check_unchanged()  # nothing changed: no error
    view = loaded["w"].numpy()

    # Same size, new bytes (a modification time one second later, as any real rewrite has).
    stat = path.stat()
    with open(path, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(np.float32(2).tobytes())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(CheckpointError, match="changed since it was opened: it was rewritten"):
        loaded.check_unchanged()

    save_safetensors(path, {"w": np.ones(4, dtype=np.float32)})  # a new file renamed over it
    with pytest.raises(CheckpointError, match="another file has replaced it"):
        loaded["w"].numpy()
    path.unlink()
    with pytest.raises(CheckpointError, match="cannot be found any more"):
        loaded.check_unchanged()
    assert view.shape == (4,)  # the old mapping itself stays valid; only new reads are refused


@pytest.mark.parametrize("stored_dtype, bad_value", [
    (np.float32, np.nan), (np.float16, np.inf), ("bf16", -np.inf), (np.float64, 1e300)])
def test_widening_a_tensor_holding_nan_or_inf_names_the_tensor_and_file(tmp_path, stored_dtype,
                                                                       bad_value):
    values = np.ones((3, 4), dtype=np.float64)
    values[2, 1] = bad_value
    array = values.astype(np.float32 if stored_dtype == "bf16" else stored_dtype)
    save_safetensors(tmp_path / "model.safetensors", {"model.norm.weight": array,
                                                       "ok": np.ones(2, np.float32)},
                     bf16=stored_dtype == "bf16")
    loaded = Checkpoint.open(tmp_path)

    with pytest.raises(CheckpointError) as error:
        loaded["model.norm.weight"].numpy(np.float32)

    message = str(error.value)
    assert "'model.norm.weight'" in message and str(tmp_path / "model.safetensors") in message
    assert "(the first at index (2, 1))" in message
    np.testing.assert_array_equal(loaded["ok"].numpy(), [1, 1])  # other tensors still read


def test_finite_weights_whose_sum_overflows_are_accepted(tmp_path):
    big = np.full(8, np.finfo(np.float32).max, dtype=np.float32)  # sum is inf, values are not
    save_safetensors(tmp_path / "model.safetensors", {"w": big})
    np.testing.assert_array_equal(Checkpoint.open(tmp_path)["w"].numpy(), big)


@pytest.mark.parametrize("shape", [[0, 2**70], [0, 2**62, 2**62], [2**41, 0], [1] * 33])
def test_absurd_declared_dimensions_are_refused_even_for_an_empty_tensor(tmp_path, shape):
    # safetensors itself accepts (0, 2**62, 2**62): 0 bytes; NumPy cannot make such an array.
    nbytes = 4 if shape == [1] * 33 else 0
    path = write_raw(tmp_path / "model.safetensors", {"w": entry(shape, 0, nbytes)},
                     data=b"\0" * nbytes)
    with pytest.raises(CheckpointError, match=r"'w'.*at most 32 dimensions and \d+ elements"):
        Checkpoint.open(tmp_path)


def test_a_header_only_the_safetensors_library_refuses_is_an_error_naming_the_file(tmp_path):
    # A hole between two tensors: the format forbids it (no room for a second file inside),
    # and it is the safetensors library's check that catches it.
    header = {"a": entry((1,), 0, 4), "b": entry((1,), 8, 12)}
    path = write_raw(tmp_path / "model.safetensors", header, data=b"\0" * 12)
    with pytest.raises(CheckpointError, match="is not a valid safetensors file: .*") as error:
        Checkpoint.open(tmp_path)
    assert str(path) in str(error.value)


# --------------------------------------------------------------------------------------------
# Directories without usable weights
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("file_name", ["pytorch_model.bin", "consolidated.00.pth"])
def test_pickle_only_directory_is_refused_with_conversion_advice(tmp_path, file_name):
    (tmp_path / file_name).write_bytes(b"\x80\x02 not really a pickle")

    with pytest.raises(CheckpointError) as error:
        Checkpoint.open(tmp_path)

    message = str(error.value)
    assert file_name in message
    assert "pickle" in message and "arbitrary code" in message
    assert "save_pretrained" in message and "safe_serialization=True" in message
    assert "safetensors.torch.save_file" in message


def test_missing_directory_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckpointError, match="does not exist") as error:
        Checkpoint.open(missing)
    assert str(missing) in str(error.value)


def test_a_file_that_is_not_safetensors_is_not_a_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="neither a checkpoint directory nor"):
        Checkpoint.open(tmp_path / "config.json")


def test_directory_without_weights_lists_what_was_looked_for(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as error:
        Checkpoint.open(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message
    assert "model.safetensors" in message and "model.safetensors.index.json" in message


# --------------------------------------------------------------------------------------------
# check_shapes
# --------------------------------------------------------------------------------------------


@pytest.fixture
def small_checkpoint(tmp_path):
    weights = {
        "model.embed_tokens.weight": np.zeros((10, 8), np.float32),
        "model.layers.0.self_attn.k_proj.weight": np.zeros((8, 8), np.float32),
        "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(2, np.float32),
        "model.norm.weight": np.zeros(8, np.float32),
    }
    save_safetensors(tmp_path / "model.safetensors", weights)
    return Checkpoint.open(tmp_path)


EXPECTED = {
    "model.embed_tokens.weight": (10, 8),
    "model.layers.0.self_attn.k_proj.weight": (8, 8),
    "model.norm.weight": (8,),
}


def test_check_shapes_accepts_a_matching_checkpoint_silently(small_checkpoint):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the inv_freq buffer must not even warn
        small_checkpoint.check_shapes(EXPECTED)


def test_check_shapes_lists_every_missing_tensor_in_one_error(small_checkpoint):
    expected = {**EXPECTED, "model.layers.0.mlp.up_proj.weight": (16, 8),
                "model.layers.0.mlp.down_proj.weight": (8, 16), "lm_head.weight": (10, 8)}
    with pytest.raises(CheckpointError, match="3 tensors the config expects are missing") as error:
        small_checkpoint.check_shapes(expected)
    for name in ["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "lm_head.weight"]:
        assert name in str(error.value)


def test_check_shapes_names_both_shapes_of_every_wrong_tensor(small_checkpoint):
    expected = {**EXPECTED, "model.layers.0.self_attn.k_proj.weight": (4, 8),
                "model.norm.weight": (16,)}
    with pytest.raises(CheckpointError) as error:
        small_checkpoint.check_shapes(expected)
    message = str(error.value)
    assert ("model.layers.0.self_attn.k_proj.weight has shape (8, 8); the config expects (4, 8)"
            in message)
    assert "model.norm.weight has shape (8,); the config expects (16,)" in message


def test_check_shapes_warns_once_about_unexpected_tensors(small_checkpoint):
    expected = {"model.embed_tokens.weight": (10, 8)}
    with pytest.warns(UserWarning) as record:
        small_checkpoint.check_shapes(expected)
    assert len(record) == 1
    message = str(record[0].message)
    assert "model.norm.weight" in message and "k_proj" in message
    assert "inv_freq" not in message


def test_check_shapes_allows_optional_tensors_to_be_absent(small_checkpoint):
    expected = {**EXPECTED, "lm_head.weight": (10, 8)}
    small_checkpoint.check_shapes(expected, optional=["lm_head.weight"])
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        small_checkpoint.check_shapes(expected)


def test_check_shapes_still_checks_an_optional_tensor_that_is_present(small_checkpoint):
    expected = {**EXPECTED, "model.norm.weight": (9,)}
    with pytest.raises(CheckpointError, match=r"model.norm.weight has shape \(8,\)"):
        small_checkpoint.check_shapes(expected, optional=["model.norm.weight"])


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def test_save_leaves_only_the_finished_file(tmp_path):
    save_safetensors(tmp_path / "model.safetensors", {"w": np.ones(3, np.float32)})
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_save_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_safetensors(path, {"old": np.ones(3, np.float32)})
    before = path.read_bytes()
    real_stored_bytes = safetensors._stored_bytes
    written = []

    def fail_on_second_tensor(array, dtype):
        if written:
            raise OSError("disk full")
        written.append(dtype)
        return real_stored_bytes(array, dtype)

    monkeypatch.setattr(safetensors, "_stored_bytes", fail_on_second_tensor)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors(path, {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)})

    assert written == ["F32"]  # the failure really happened after some data was written
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_save_that_fails_on_a_new_path_creates_nothing(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError("fsync failed")

    monkeypatch.setattr(files.os, "fsync", fail)
    with pytest.raises(OSError, match="fsync failed"):
        save_safetensors(tmp_path / "new.safetensors", {"a": np.ones(4, np.float32)})
    assert list(tmp_path.iterdir()) == []


def has_anonymous_files(directory) -> bool:
    """Whether atomic_write can write into ``directory`` through a file with no name (O_TMPFILE)."""
    handle = files._anonymous_file(directory)
    if handle is not None:
        os.close(handle)
    return handle is not None


@pytest.mark.skipif(not HAS_FLOCK, reason="O_TMPFILE is Linux's")
def test_a_writer_killed_midway_leaves_the_old_file_whole_and_no_other(tmp_path):
    if not has_anonymous_files(tmp_path):
        pytest.skip("this filesystem has no O_TMPFILE; the named temporary file is tested below")
    path = tmp_path / "out.npz"
    path.write_bytes(b"the old output")
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import os, sys, time
        from pathlib import Path
        from llama_np.formats.files import atomic_write
        def chunks():
            yield b"half of the new output"
            print(sorted(os.listdir(sys.argv[1])), flush=True)  # while the write is under way
            time.sleep(60)
            yield b"never written"
        atomic_write(Path(sys.argv[1]) / "out.npz", chunks())
        """), tmp_path], stdout=subprocess.PIPE, text=True)
    try:
        listed_while_writing = writer.stdout.readline()
    finally:
        writer.kill()
        writer.wait(timeout=60)
        writer.stdout.close()

    assert writer.returncode == -signal.SIGKILL
    assert listed_while_writing == "['out.npz']\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.npz"]
    assert path.read_bytes() == b"the old output"


@pytest.mark.parametrize("refusal", [errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL])
def test_where_anonymous_files_are_refused_a_named_temporary_file_does_the_write(
        tmp_path, monkeypatch, refusal):
    real_open = files.os.open

    def open_without_tmpfile(path, flags, *args, **kwargs):
        if flags & getattr(os, "O_TMPFILE", 0) == getattr(os, "O_TMPFILE", -1):
            raise OSError(refusal, os.strerror(refusal))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(files.os, "open", open_without_tmpfile)
    made = []
    real_mkstemp = files.tempfile.mkstemp
    monkeypatch.setattr(files.tempfile, "mkstemp", lambda **kwargs: made.append(1) or real_mkstemp(**kwargs))
    path = tmp_path / "model.safetensors"
    save_safetensors(path, {"w": np.ones(2, np.float32)})

    assert made == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    np.testing.assert_array_equal(Checkpoint.open(path)["w"].numpy(), [1, 1])
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_next_save_removes_the_temporary_file_a_killed_writer_left_and_nothing_else(tmp_path):
    path = tmp_path / "model.safetensors"
    result = run_python("""
        import os, signal, sys
        import numpy as np
        from llama_np.formats import safetensors
        if hasattr(os, "O_TMPFILE"):
            del os.O_TMPFILE  # a system without anonymous files: the temporary file has a name
        real_stored_bytes = safetensors._stored_bytes
        def killed_after_the_first_tensor(array, dtype):
            if array.shape == (3,):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_stored_bytes(array, dtype)
        safetensors._stored_bytes = killed_after_the_first_tensor
        safetensors.save_safetensors(sys.argv[1], {"a": np.ones(4, np.float64),
                                                  "b": np.ones(3, np.float32)})
        """, path)
    assert result.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and re.fullmatch(r"\.model\.safetensors\.[a-z0-9_]{8}\.tmp", left[0])
    others = [".model.safetensors.notours.tmp", ".config.json.abcdefgh.tmp",
              "model.safetensors.abcdefgh.tmp"]
    for name in others:
        (tmp_path / name).write_bytes(b"not our temporary file for model.safetensors")

    save_safetensors(path, {"w": np.ones(2, np.float32)})

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others + ["model.safetensors"])
    np.testing.assert_array_equal(Checkpoint.open(path)["w"].numpy(), [1, 1])


@pytest.mark.skipif(not HAS_FLOCK, reason="needs flock to tell live writers apart")
def test_a_temporary_file_a_live_writer_holds_is_left_alone(tmp_path):
    live = tmp_path / ".model.safetensors.abcd1234.tmp"
    live.write_bytes(b"half written")
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        save_safetensors(tmp_path / "model.safetensors", {"w": np.ones(2, np.float32)})
        assert live.exists()
    save_safetensors(tmp_path / "model.safetensors", {"w": np.ones(2, np.float32)})
    assert not live.exists()


@pytest.mark.skipif(not HAS_FLOCK, reason="needs flock to tell live writers apart")
def test_a_write_whose_new_temporary_file_is_taken_by_a_cleanup_makes_another(tmp_path,
                                                                            monkeypatch):
    monkeypatch.delattr(files.os, "O_TMPFILE", raising=False)  # the named temporary file only
    real_mkstemp = files.tempfile.mkstemp
    made = []

    def mkstemp_then_another_writer_cleans_up(**kwargs):
        handle, name = real_mkstemp(**kwargs)
        made.append(name)
        if len(made) == 1:
            os.unlink(name)  # what another writer's cleanup does between mkstemp and our lock
        return handle, name

    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp_then_another_writer_cleans_up)
    save_safetensors(tmp_path / "model.safetensors", {"w": np.ones(2, np.float32)})

    assert len(made) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    np.testing.assert_array_equal(Checkpoint.open(tmp_path)["w"].numpy(), [1, 1])


@pytest.mark.parametrize("array", [np.arange(3), np.ones(2, dtype=np.complex64),
                                   np.array([True])])
def test_save_rejects_dtypes_llama_np_cannot_read(tmp_path, array):
    with pytest.raises(CheckpointError, match="expected float64, float32 or float16"):
        save_safetensors(tmp_path / "x.safetensors", {"w": array})
    assert list(tmp_path.iterdir()) == []


def test_saved_header_is_padded_to_eight_bytes_and_tensors_are_aligned(tmp_path):
    path = tmp_path / "x.safetensors"
    save_safetensors(path, {"h": np.ones(3, np.float16), "d": np.ones(1, np.float64),
                            "f": np.ones(3, np.float32)}, metadata={"note": "x"})
    (header_length,) = struct.unpack("<Q", path.read_bytes()[:8])

    tensors, metadata = read_safetensors_header(path)

    assert header_length % 8 == 0
    assert metadata == {"note": "x"}
    for info in tensors.values():
        assert info.start % CODECS[info.dtype].stored_dtype.itemsize == 0


# --------------------------------------------------------------------------------------------
# Opening reads headers only
# --------------------------------------------------------------------------------------------


def test_opening_and_mapping_a_2_gb_sparse_checkpoint_is_fast_and_reads_no_tensor_bytes(tmp_path):
    elements = 2**29  # 2 GiB of float32, never written: the file is sparse
    header = json.dumps({"big": entry((elements,), 0, elements * 4),
                         "small": entry((2,), elements * 4, elements * 4 + 8)}).encode()
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + elements * 4 + 8)

    start = time.perf_counter()
    loaded = Checkpoint.open(tmp_path)
    # stored() faults in one page, not two gigabytes (numpy() reads them all once: the check
    # for NaN and inf)
    last = loaded["big"].stored()[-1]
    elapsed = time.perf_counter() - start

    assert loaded.nbytes == elements * 4 + 8
    assert loaded["big"].shape == (elements,)
    assert last == 0.0
    assert elapsed < 1.0


# --------------------------------------------------------------------------------------------
# Model lookup by path or bundled name
# --------------------------------------------------------------------------------------------


@pytest.fixture
def assets(tmp_path, monkeypatch):
    assets_dir = tmp_path / "assets"
    (assets_dir / "tiny-shakespeare").mkdir(parents=True)
    (assets_dir / "tiny-shakespeare-classifier").mkdir()
    (assets_dir / "__pycache__").mkdir()
    monkeypatch.setattr(locate, "ASSETS_DIR", assets_dir)
    return assets_dir


def test_existing_directory_is_returned_as_is(tmp_path, assets):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    assert resolve_model_path(model_dir) == model_dir
    assert resolve_model_path(str(model_dir)) == model_dir


def test_bundled_name_resolves_to_the_assets_directory(assets):
    assert bundled_model_names() == ["tiny-shakespeare", "tiny-shakespeare-classifier"]
    assert resolve_model_path("tiny-shakespeare") == assets / "tiny-shakespeare"


def test_unknown_name_lists_the_bundled_models(assets):
    with pytest.raises(CheckpointError) as error:
        resolve_model_path("tiny-shakespear")
    message = str(error.value)
    assert "tiny-shakespear does not exist" in message
    assert "tiny-shakespeare, tiny-shakespeare-classifier" in message


def test_unknown_name_without_bundled_models_says_none_are_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(locate, "ASSETS_DIR", tmp_path / "no-assets")
    with pytest.raises(CheckpointError, match="none are installed"):
        resolve_model_path("tiny-shakespeare")


def test_a_file_is_not_a_model_directory(tmp_path, assets):
    file_path = tmp_path / "config.json"
    file_path.write_text("{}")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_model_path(file_path)


@pytest.mark.parametrize("name", [5, None, b"tiny-shakespeare", ["tiny-shakespeare"]])
def test_a_model_name_that_is_not_a_str_or_path_is_a_checkpoint_error(name):
    with pytest.raises(CheckpointError, match=rf"path or a bundled model name .*got {type(name).__name__}"):
        resolve_model_path(name)


def test_saved_files_get_the_usual_permissions_not_private_temp_ones(tmp_path):
    import os
    import stat

    path = tmp_path / "model.safetensors"
    save_safetensors(path, {"w": np.zeros(2, np.float32)})
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


# --------------------------------------------------------------------------------------------
# Files that may not be read
# --------------------------------------------------------------------------------------------


@pytest.fixture
def model_directory(tmp_path):
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2)
    LlamaForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "generation_config.json").write_text('{"max_length": 20}')
    return tmp_path / "model"


@pytest.mark.parametrize("file_name, error_type", [
    ("config.json", ConfigError), ("model.safetensors", CheckpointError),
    ("generation_config.json", CheckpointError)])
def test_an_unreadable_file_of_a_model_is_an_error_naming_it(model_directory, deny_access,
                                                            file_name, error_type):
    deny_access(model_directory / file_name)
    with pytest.raises(error_type, match="Permission denied") as error:
        LlamaForCausalLM.from_pretrained(model_directory)
    assert str(model_directory / file_name) in str(error.value)


def test_a_model_directory_that_may_not_be_searched_is_an_error_naming_it(model_directory,
                                                                         deny_access):
    deny_access(model_directory)
    with pytest.raises(ConfigError, match="cannot look for .*config.json: Permission denied"):
        LlamaForCausalLM.from_pretrained(model_directory)
    with pytest.raises(CheckpointError, match="cannot look for .*model.safetensors: Permission"):
        Checkpoint.open(model_directory)


@pytest.mark.parametrize("denied", ["model.safetensors.index.json", "a.safetensors"])
def test_an_unreadable_index_or_shard_is_an_error_naming_it(tmp_path, deny_access, denied):
    write_sharded(tmp_path, {"a.safetensors": {"x": np.ones(2, np.float32)},
                             "b.safetensors": {"y": np.ones(2, np.float32)}})
    deny_access(tmp_path / denied)
    with pytest.raises(CheckpointError, match=f"cannot read {re.escape(str(tmp_path / denied))}: "
                                              "Permission denied"):
        Checkpoint.open(tmp_path)


def test_a_header_declaring_a_million_tensors_is_refused_before_checking_each(tmp_path):
    count = 150_000
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(count)}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(CheckpointError, match=f"declares {count:,} tensors; a checkpoint file holds at most 100,000"):
        read_safetensors_header(tmp_path / "model.safetensors")


def test_a_directory_with_no_weights_names_every_layout_looked_for(tmp_path):
    LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"model.safetensors or model.safetensors.index.json, "
                                              r"pytorch_model.bin or its index, and Meta's consolidated"):
        LlamaForCausalLM.from_pretrained(tmp_path)
