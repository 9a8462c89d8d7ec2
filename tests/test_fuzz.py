"""Property-based fuzzing of the readers of untrusted bytes: safetensors, tokenizer.model, and
the .npz files that llama-np compare and diff read.

Whatever the bytes, a reader either loads the file or raises a LlamaNPError; any other exception
(an IndexError, a NumPy ValueError, a struct.error, ...) fails the test, and hypothesis shrinks
it to a small example. Each test is bounded to a couple of hundred examples so that the file
runs in seconds.
"""

import json
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llama_np.text.bpe import read_model
from llama_np.formats.safetensors import Checkpoint, read_safetensors_header, save_safetensors
from llama_np.formats.npz import read_npz
from llama_np.errors import LlamaNPError
from llama_np.text.tokenizer import LlamaTokenizer

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
TOKENIZER_MODEL = Path(__file__).parent / "data" / "tokenizer" / "tokenizer.model"


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory)


def mutated(original: bytes, flips, cut) -> bytes:
    """``original`` with some bytes replaced (position, new value) and then cut to ``cut``."""
    data = bytearray(original)
    for position, value in flips:
        data[position % len(data)] = value
    return bytes(data[:cut])


def flips_and_cut(length: int):
    return (st.lists(st.tuples(st.integers(0, length - 1), st.integers(0, 255)), max_size=6),
            st.integers(0, length))


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------


def read_every_tensor(path: Path) -> None:
    """Open the file as a checkpoint and widen every tensor; LlamaNPError is an allowed outcome."""
    try:
        read_safetensors_header(path)
        loaded = Checkpoint.open(path)
        for name in loaded:
            loaded[name].numpy(np.float32)
            loaded[name].numpy(np.float64)
    except LlamaNPError:
        pass


def valid_safetensors(workdir: Path) -> bytes:
    path = workdir / "valid.safetensors"
    save_safetensors(path, {"model.norm.weight": np.arange(4, dtype=np.float32),
                            "h": np.ones((2, 3), dtype=np.float16),
                            "d": np.full(1, 0.5)}, metadata={"format": "pt"})
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_a_safetensors_file_with_flipped_bytes_or_cut_short_loads_or_is_a_checkpoint_error(
        workdir, data):
    original = valid_safetensors(workdir)
    flips, cut = flips_and_cut(len(original))
    path = workdir / "fuzzed.safetensors"
    path.write_bytes(mutated(original, data.draw(flips), data.draw(cut)))
    read_every_tensor(path)


JSON_SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
                | st.text(max_size=8))
ANY_JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
DIMENSION = st.sampled_from([0, 0, 1, 2, 3, 2**62, 2**70]) | st.integers(-1, 2**70)
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I8": 1, "BOOL": 1}


@st.composite
def headers_and_data(draw):
    """A header close to a valid one (contiguous offsets matching the shapes, with the odd
    deviation) and a data section of about the right size, so that fuzzing reaches past the
    first checks; now and then an entry is arbitrary JSON instead."""
    header, offset = {}, 0
    for name in draw(st.lists(st.text(max_size=8), unique=True, max_size=3)):
        if draw(st.integers(0, 19)) == 0:
            header[name] = draw(ANY_JSON)
            continue
        dtype = draw(st.sampled_from(["F64", "F32", "F16", "BF16"] * 3 + ["I8", "BOOL"]))
        shape = draw(st.lists(DIMENSION, max_size=3))
        nbytes = int(np.prod([max(n, 0) for n in shape], dtype=object)) * ITEMSIZE[dtype]
        begin = offset + draw(st.sampled_from([0] * 8 + [-1, 2]))
        end = begin + nbytes + draw(st.sampled_from([0] * 8 + [-2, 4]))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        offset = max(offset, end)
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4))
                                      | ANY_JSON)
    size = offset + draw(st.sampled_from([0] * 8 + [-1, 3])) if offset <= 4096 else 64
    data = draw(st.binary(min_size=max(size, 0), max_size=max(size, 0)))
    return header, data


@settings(FUZZ, max_examples=400)
@example(header_and_data=({"w": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}},
                          b""), length_error=0)  # once a NumPy ValueError
@given(header_and_data=headers_and_data(), length_error=st.sampled_from([0] * 8 + [-1, 1, 2**40]))
def test_a_safetensors_file_with_a_random_json_header_loads_or_is_a_checkpoint_error(
        workdir, header_and_data, length_error):
    header, data = header_and_data
    header_bytes = json.dumps(header).encode()
    length = max(0, len(header_bytes) + length_error)
    path = workdir / "random.safetensors"
    path.write_bytes(struct.pack("<Q", length) + header_bytes + data)
    read_every_tensor(path)


@FUZZ
@given(header=ANY_JSON)
def test_a_safetensors_header_of_any_json_value_is_a_checkpoint_error_or_loads(workdir, header):
    header_bytes = json.dumps(header).encode()
    path = workdir / "any.safetensors"
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes)
    read_every_tensor(path)


# --------------------------------------------------------------------------------------------
# tokenizer.model
# --------------------------------------------------------------------------------------------


def load_tokenizer(directory: Path) -> None:
    """Both readers of tokenizer.model, and one encode/decode with what loaded."""
    for read in (read_model, lambda path: LlamaTokenizer.from_pretrained(path.parent)):
        try:
            loaded = read(directory / "tokenizer.model")
        except LlamaNPError:
            continue
        if isinstance(loaded, LlamaTokenizer):
            try:
                loaded.decode(loaded.encode("Hello wörld <s> 123"))
            except LlamaNPError:
                pass


@FUZZ
@given(data=st.data())
def test_a_tokenizer_model_with_flipped_bytes_or_cut_short_loads_or_is_a_tokenizer_error(
        workdir, data):
    original = TOKENIZER_MODEL.read_bytes()
    flips, cut = flips_and_cut(len(original))
    directory = workdir / "tokenizer"
    directory.mkdir(exist_ok=True)
    (directory / "tokenizer.model").write_bytes(
        mutated(original, data.draw(flips), data.draw(cut)))
    load_tokenizer(directory)


@FUZZ
@given(blob=st.binary(max_size=256))
def test_random_bytes_as_a_tokenizer_model_load_or_are_a_tokenizer_error(workdir, blob):
    directory = workdir / "random-tokenizer"
    directory.mkdir(exist_ok=True)
    (directory / "tokenizer.model").write_bytes(blob)
    load_tokenizer(directory)


def test_the_fuzzed_originals_themselves_load(workdir):
    # The mutations start from files that load, so a reader that refused everything would fail.
    directory = workdir / "original"
    directory.mkdir()
    shutil.copyfile(TOKENIZER_MODEL, directory / "tokenizer.model")
    assert LlamaTokenizer.from_pretrained(directory).vocab_size == 1000
    assert len(read_model(directory / "tokenizer.model").pieces) == 1000
    (directory / "model.safetensors").write_bytes(valid_safetensors(workdir))
    assert sorted(Checkpoint.open(directory)) == ["d", "h", "model.norm.weight"]


# --------------------------------------------------------------------------------------------
# .npz files read by compare and diff
# --------------------------------------------------------------------------------------------


def _reference_npz(path: Path) -> bytes:
    rng = np.random.default_rng(0)
    np.savez(path, input_ids=np.array([[1, 5, 9]]), logits=rng.normal(size=(1, 3, 4)).astype(np.float32),
             attention_mask=np.ones((1, 3), dtype=np.int64))
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_a_mutated_npz_either_loads_or_is_an_input_error(workdir, data):
    original = _reference_npz(workdir / "reference.npz")
    flips, cut = data.draw(st.tuples(*flips_and_cut(len(original))))
    path = workdir / "mutated.npz"
    path.write_bytes(mutated(original, flips, cut))
    try:
        arrays = read_npz(path)
    except LlamaNPError:
        return
    assert all(isinstance(array, np.ndarray) for array in arrays.values())
