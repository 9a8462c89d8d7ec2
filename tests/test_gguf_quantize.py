"""Writing GGUF: the block encoders byte for byte as llama.cpp's ``gguf.quants.quantize``, and
``quantize_to_gguf`` / ``llama-np quantize`` byte for byte as llama.cpp's ``convert_hf_to_gguf.py``.

The oracles: llama.cpp's own Python package, ``gguf`` (a dev dependency), whose quantisers are
ggml's reference round-to-nearest (``quantize_row_q8_0_ref`` …) written in NumPy; the SHA-256 of
what ``convert_hf_to_gguf.py`` wrote for two small checkpoints at a pinned llama.cpp commit
(tests/reference/make_gguf_quantize_reference.py, tests/data/gguf_quantize/manifest.json); and
the GGUF files of tests/data/gguf, written with ``gguf.GGUFWriter`` and ``gguf.quants``.
"""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import llama_np
from llama_np import LlamaForCausalLM, LlamaTokenizer
from llama_np.errors import CheckpointError
from llama_np.formats import gguf as gguf_format
from llama_np.formats.gguf_writer import quantize_to_gguf
from llama_np.formats.safetensors import Checkpoint
from llama_np.weights.codecs import CODECS, WRITTEN_TYPES, BlockCodec

DATA = Path(__file__).resolve().parent / "data"
QUANTIZE_DATA = DATA / "gguf_quantize"
MANIFEST = json.loads((QUANTIZE_DATA / "manifest.json").read_text(encoding="utf-8"))
BUNDLED = Path(llama_np.__file__).resolve().parent / "assets" / "tiny-shakespeare"

ENCODED = [CODECS[name] for name in WRITTEN_TYPES if isinstance(CODECS[name], BlockCodec)]


def hard_rows(rng) -> np.ndarray:
    """(rows, 64) float32: random rows, then rows with zeros, ties, huge and tiny values."""
    random = rng.standard_normal((200, 64)).astype(np.float32)
    zeros = random[:8].copy()
    zeros[0] = 0  # a row of zeros: d = 0
    zeros[1, :32] = 0  # one block of zeros, one not
    zeros[2, ::2] = 0
    zeros[3] = -0.0
    ties = np.zeros((6, 64), np.float32)
    ties[0, :32] = np.arange(32) - 15.5  # q8: d = 16/127; halves everywhere
    ties[1, :32] = np.linspace(-127, 127, 32)  # d = 1 exactly: x / d on .5 and whole numbers
    ties[1, 32:] = np.arange(32) * 0.5 - 8  # Q4_0: d = -1, halves after + 8.5
    ties[2, :32] = 1.0  # all equal: Q4_1/Q5_1 get d = 0
    ties[2, 32:] = [3.0, -3.0] * 16  # largest magnitude twice, with both signs: the first wins
    ties[3, :32] = [-3.0, 3.0] * 16
    ties[4, :] = np.float32(0.49999997) * np.arange(64)  # fractions just below a half
    ties[5, :] = np.arange(64) % 17 - 8.0
    with np.errstate(over="ignore"):  # 3e38 times more than 1.2 is inf: a row with infinities
        huge = random[:6] * np.array([[3e38], [1e30], [65504.0], [65504.0 * 127], [1e5], [-3.4e38]], np.float32)
    tiny = random[:6] * np.array([[1e-45], [1e-40], [1e-38], [6e-8], [1e-30], [2e-38]], np.float32)
    mixed = random[:4].copy()
    mixed[:, 5] = [3e38, -1e-40, 65504.0, -1e20]
    return np.concatenate([random, zeros, ties, huge, tiny, mixed])


@pytest.mark.parametrize("codec", ENCODED, ids=lambda c: c.name)
def test_block_encoder_writes_the_bytes_of_gguf_quantize(codec):
    gguf = pytest.importorskip("gguf")
    rows = hard_rows(np.random.default_rng(list(CODECS).index(codec.name)))
    with np.errstate(all="ignore"):  # tiny scales overflow 1/d in both, as in C
        expected = gguf.quants.quantize(rows, gguf.GGMLQuantizationType[codec.name])
    encoded = codec.encode(rows)
    assert encoded.shape == (rows.shape[0], 64 // codec.block_size, codec.block_bytes)
    assert encoded.dtype == np.uint8
    different = np.any(encoded.reshape(expected.shape) != expected, axis=-1)
    assert not different.any(), f"{codec.name}: rows {np.flatnonzero(different).tolist()} differ"


@pytest.mark.parametrize("codec", ENCODED, ids=lambda c: c.name)
def test_encoded_blocks_decode_within_a_rounding_step_of_the_numbers(codec):
    numbers = np.random.default_rng(0).standard_normal((50, 96)).astype(np.float32)
    decoded = codec.decode(codec.encode(numbers)).reshape(-1, 32)
    numbers = numbers.reshape(-1, 32)
    largest, spread = np.abs(numbers).max(axis=1), numbers.max(axis=1) - numbers.min(axis=1)
    # (the step d, how many steps the error may be): Q4_0/Q5_0 clip the far end of the range
    # (x_max maps to q = 0, the other sign stops one step short); the others round to nearest.
    step, steps = {"Q8_0": (largest / 127, 0.5), "Q4_0": (largest / 8, 1.0), "Q5_0": (largest / 16, 1.0),
                   "Q4_1": (spread / 15, 0.5), "Q5_1": (spread / 31, 0.5)}[codec.name]
    float16_scale = largest * 2e-3  # d (and m) rounded to float16, times up to 127 steps
    error = np.abs(decoded - numbers).max(axis=1)
    assert np.all(error <= steps * step + float16_scale), f"{codec.name}: worst {np.max(error / step):.3f} steps"


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_float_encoders_write_the_bytes_of_gguf_quantize(name):
    gguf = pytest.importorskip("gguf")
    rows = hard_rows(np.random.default_rng(1))
    rows[0, :4] = [np.inf, -np.inf, np.nan, 65520.0]
    with np.errstate(all="ignore"):
        expected = gguf.quants.quantize(rows, gguf.GGMLQuantizationType[name])
        encoded = CODECS[name].encode(rows)
    assert encoded.tobytes() == np.ascontiguousarray(expected).tobytes()


def test_a_row_not_a_multiple_of_the_block_and_a_k_quant_are_refused_by_name():
    with pytest.raises(CheckpointError, match="blocks of 32 numbers, and 40 is not a multiple"):
        CODECS["Q4_0"].encode(np.zeros((2, 40), np.float32))
    with pytest.raises(CheckpointError, match="reads Q4_K but does not write it"):
        CODECS["Q4_K"].encode(np.zeros((1, 256), np.float32))


# ---------------------------------------------------------------------------- files as llama.cpp's converter writes them


def source_directory(source: str, tmp_path: Path) -> Path:
    """The converter's input for ``source``, in a directory of that name (general.name comes from
    it), as tests/reference/make_gguf_quantize_reference.py made it."""
    if source == "gqa_2shards-hf":
        return DATA / "meta" / "gqa_2shards-hf"  # its reference.npz beside the checkpoint is never read
    directory = tmp_path / source
    shutil.copytree(BUNDLED if source == "tiny-shakespeare" else DATA / "fixtures" / source, directory)
    shutil.copyfile(QUANTIZE_DATA / source / "config.json", directory / "config.json")  # 4.x spelling
    if source == "gqa_f32":  # a tokenizer for the converter, of fewer tokens than the vocabulary
        shutil.copyfile(DATA / "meta" / "gqa_2shards-hf" / "tokenizer.model", directory / "tokenizer.model")
    return directory


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


CONVERTED = sorted(name for name, file in MANIFEST["files"].items() if "from" not in file)
REQUANTIZED = sorted(name for name, file in MANIFEST["files"].items() if "from" in file)


@pytest.mark.parametrize("file_name", CONVERTED)
def test_quantize_writes_the_bytes_convert_hf_to_gguf_wrote(file_name, tmp_path):
    expected = MANIFEST["files"][file_name]
    out = tmp_path / file_name
    result = quantize_to_gguf(source_directory(expected["source"], tmp_path), out, expected["llama_np_type"])
    assert result.bytes == out.stat().st_size == expected["bytes"]
    assert sha256(out) == expected["sha256"], f"{file_name} differs from llama.cpp {MANIFEST['llama_cpp_commit'][:10]}'s"


@pytest.mark.parametrize("file_name", REQUANTIZED)
def test_quantizing_an_f32_file_writes_the_bytes_llama_quantize_pure_wrote(file_name, tmp_path):
    expected = MANIFEST["files"][file_name]
    source = MANIFEST["files"][expected["from"]]  # the converter's F32 file, written here as it wrote it
    f32 = quantize_to_gguf(source_directory(expected["source"], tmp_path), tmp_path / expected["from"],
                           source["llama_np_type"]).path
    assert sha256(f32) == source["sha256"]
    out = quantize_to_gguf(f32, tmp_path / file_name, expected["llama_np_type"]).path
    assert out.stat().st_size == expected["bytes"]
    assert sha256(out) == expected["sha256"], f"{file_name} differs from llama-quantize {MANIFEST['llama_cpp_commit'][:10]}'s"


def test_llama_cpp_and_llama_np_generate_the_same_text_from_the_written_q8_0_file(tmp_path):
    """llama.cpp's llama-simple (greedy) ran the converter's Q8_0 file, whose bytes quantize writes."""
    run = MANIFEST["llama_simple"]
    expected = MANIFEST["files"][run["file"]]
    path = quantize_to_gguf(source_directory(expected["source"], tmp_path), tmp_path / run["file"], "Q8_0").path
    assert sha256(path) == expected["sha256"]
    model, tokenizer = LlamaForCausalLM.from_pretrained(path), LlamaTokenizer.from_pretrained(path)
    input_ids = tokenizer(run["prompt"], return_tensors="np")["input_ids"]
    generated = model.generate(input_ids, max_new_tokens=run["n_predict"])
    assert tokenizer.decode(generated[0]) == run["text"]


def test_the_stored_llama_quantize_file_runs_as_ours(tmp_path):
    theirs = QUANTIZE_DATA / "gqa_f32-F32-Q4_0.gguf"
    f32 = quantize_to_gguf(source_directory("gqa_f32", tmp_path), tmp_path / "f32.gguf", "F32").path
    ours = quantize_to_gguf(f32, tmp_path / "q4.gguf", "Q4_0").path
    assert list(gguf_format.read_gguf(ours).tensors) == list(gguf_format.read_gguf(theirs).tensors)
    input_ids = np.array([[1, 5, 9, 200, 3]])
    np.testing.assert_array_equal(LlamaForCausalLM.from_pretrained(ours)(input_ids).logits,
                                  LlamaForCausalLM.from_pretrained(theirs)(input_ids).logits)


def test_encoding_a_few_rows_at_a_time_writes_the_same_bytes(tmp_path, monkeypatch):
    from llama_np.formats import gguf_writer

    monkeypatch.setattr(gguf_writer, "ENCODED_AT_A_TIME", 100)  # 3 rows of 32 numbers, 1 of 72
    expected = MANIFEST["files"]["gqa_2shards-hf-Q8_0.gguf"]
    out = quantize_to_gguf(DATA / "meta" / "gqa_2shards-hf", tmp_path / "q.gguf", "Q8_0").path
    assert sha256(out) == expected["sha256"]


def test_the_stored_converter_file_reads_as_ours_key_for_key_and_tensor_for_tensor(tmp_path):
    theirs = gguf_format.read_gguf(QUANTIZE_DATA / "gqa_2shards-hf-Q8_0.gguf")
    result = quantize_to_gguf(DATA / "meta" / "gqa_2shards-hf", tmp_path / "ours.gguf", "Q8_0")
    ours = gguf_format.read_gguf(result.path)
    assert list(ours.metadata) == list(theirs.metadata)
    for key, value in theirs.metadata.items():
        assert np.array_equal(ours.metadata[key], value) if isinstance(value, np.ndarray) else ours.metadata[key] == value, key
    assert [(t.name, t.dtype, t.shape) for t in ours.tensors.values()] == \
        [(t.name, t.dtype, t.shape) for t in theirs.tensors.values()]
    assert result.fallbacks == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]


def tensor_bytes(path: Path) -> dict[str, bytes]:
    gguf = gguf_format.read_gguf(path)
    raw = path.read_bytes()
    return {name: raw[info.start:info.stop] for name, info in gguf.tensors.items()}


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16"])
def test_each_type_writes_the_tensor_bytes_of_the_gguf_package(type_name, tmp_path):
    """tests/data/gguf/gqa_f32-<type>.gguf was written with gguf.GGUFWriter and gguf.quants.quantize
    from the same fixture, q/k permuted as the converter does; its metadata is not the converter's."""
    ours = quantize_to_gguf(DATA / "fixtures" / "gqa_f32", tmp_path / "ours.gguf", type_name)
    assert tensor_bytes(ours.path) == tensor_bytes(DATA / "gguf" / f"gqa_f32-{type_name}.gguf")


def test_a_meta_checkpoint_and_a_float_gguf_file_quantise_to_the_same_tensors(tmp_path):
    from_hf = quantize_to_gguf(DATA / "meta" / "gqa_2shards-hf", tmp_path / "hf.gguf", "Q4_0")
    from_meta = quantize_to_gguf(DATA / "meta" / "gqa_2shards", tmp_path / "meta.gguf", "Q4_0")
    assert tensor_bytes(from_meta.path) == tensor_bytes(from_hf.path)
    from_f32_file = quantize_to_gguf(DATA / "gguf" / "gqa_f32-F32.gguf", tmp_path / "f32.gguf", "Q4_0")
    assert tensor_bytes(from_f32_file.path) == tensor_bytes(DATA / "gguf" / "gqa_f32-Q4_0.gguf")


def test_a_written_file_reads_alike_with_gguf_reader_and_ours(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = quantize_to_gguf("tiny-shakespeare", tmp_path / "t.gguf", "Q4_0").path
    ours = gguf_format.read_gguf(path)
    reader = gguf.GGUFReader(path)
    fields = {key: field for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    assert list(fields) == list(ours.metadata)
    for key, field in fields.items():
        value, contents = ours.metadata[key], field.contents()
        assert np.array_equal(value, contents) if isinstance(value, np.ndarray) else value == contents, key
    for tensor in reader.tensors:
        info = ours.tensors[tensor.name]
        assert (info.dtype, info.start, info.stop - info.start) == \
            (tensor.tensor_type.name, tensor.data_offset, tensor.n_bytes)  # data_offset: from the file's start
        assert info.shape == tuple(reversed([int(n) for n in tensor.shape]))


@pytest.mark.parametrize("type_name", ["F32", "F16"])
def test_an_f32_or_f16_file_of_the_bundled_model_gives_its_logits_and_token_ids(type_name, tmp_path):
    path = quantize_to_gguf("tiny-shakespeare", tmp_path / "t.gguf", type_name).path
    source, written = LlamaForCausalLM.from_pretrained("tiny-shakespeare"), LlamaForCausalLM.from_pretrained(path)
    input_ids = np.array([[1, 450, 1058, 338, 7, 99, 1500], [1, 3, 4, 5, 6, 7, 8]])
    # float16 weights widen to the same float32 numbers either way: the logits are equal, not close
    np.testing.assert_array_equal(written(input_ids).logits, source(input_ids).logits)
    text = "ROMEO: But soft, what light through yonder window breaks? <s>"
    original = LlamaTokenizer.from_pretrained("tiny-shakespeare", legacy=False)
    assert LlamaTokenizer.from_pretrained(path)(text)["input_ids"] == original(text)["input_ids"]


@pytest.mark.parametrize("fixture", ["gqa_f32", "mqa_tied_f16", "bias_head_dim", "mha_bf16_sharded_4x", "pretraining_tp2"])
def test_an_f32_file_reads_back_as_the_fixtures_tensors(fixture, tmp_path):
    """Names, q/k rows (biases too) permuted and back, tied embeddings, shards, bfloat16."""
    path = quantize_to_gguf(DATA / "fixtures" / fixture, tmp_path / "f.gguf", "F32").path
    _, written = gguf_format.open_gguf_checkpoint(path)
    source = Checkpoint.open(DATA / "fixtures" / fixture)
    assert set(written) == set(source)
    for name in source:
        np.testing.assert_array_equal(written[name].numpy(), source[name].numpy(), err_msg=name)


def test_a_rope_type_llama_cpp_files_cannot_hold_as_written_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="RoPE type 'yarn' is not written to GGUF"):
        quantize_to_gguf(DATA / "fixtures" / "rope_yarn", tmp_path / "y.gguf", "F32")
    assert not (tmp_path / "y.gguf").exists()


@pytest.mark.parametrize("parameters", [999, 1000, 1001, 3795200, 26112, 6738415616, 999_999_999, 70_553_706_496, 1_500_000_000_000])
def test_size_label_is_gguf_size_label(parameters):
    gguf = pytest.importorskip("gguf")
    from llama_np.formats.gguf_writer import size_label

    assert size_label(parameters) == gguf.utility.size_label(parameters, 0, 0, 0)


@pytest.mark.parametrize("directory", ["tiny-shakespeare", "gqa_2shards-hf", "Llama-2-7b-chat-hf", "my model v1.2", "TinyLlama-1.1B"])
def test_general_name_is_gguf_metadata_id_to_title(directory):
    gguf = pytest.importorskip("gguf")
    from llama_np.formats.gguf_writer import title_of

    assert title_of(directory) == gguf.metadata.Metadata.id_to_title(directory)


# ---------------------------------------------------------------------------- llama-np quantize


def run_cli(capsys, *argv):
    from llama_np.cli.main import main  # the command line, only for these tests

    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_quantize_verb_writes_the_file_and_names_the_matrices_kept_in_f16(capsys, tmp_path):
    out = tmp_path / "t.gguf"
    status, stdout, err = run_cli(capsys, "quantize", "tiny-shakespeare", out, "--type", "Q4_0")
    assert status == 0, err
    assert f"wrote {out}: 39 tensors (Q4_0 26, F32 9, F16 4)" in stdout
    assert ("kept in F16, as llama.cpp's converter does: 4 matrices whose rows are not a multiple of 32 "
            "numbers (model.layers.0.mlp.down_proj.weight,") in stdout
    assert gguf_format.read_gguf(out).metadata["general.file_type"] == 2  # llama.cpp's MOSTLY_Q4_0


@pytest.mark.parametrize("argv, message", [
    (["tiny-shakespeare", "{out}", "--type", "Q4_K"], "argument --type: invalid choice: 'Q4_K'"),
    (["{data}/gguf/gqa_f32-Q4_0.gguf", "{out}"], "is already quantised (Q4_0)"),
    (["{tmp}/missing", "{out}"], "missing does not exist"),
    (["tiny-shakespeare", "{tmp}"], "is a directory; give the GGUF file to write"),
])
def test_quantize_verb_refuses_bad_input_in_one_line_and_writes_nothing(capsys, tmp_path, argv, message):
    out = tmp_path / "out.gguf"
    argv = [a.format(out=out, data=DATA, tmp=tmp_path) for a in argv]
    status, _, err = run_cli(capsys, "quantize", *argv)
    assert status == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_failure_while_writing_leaves_no_file_and_no_temporary(tmp_path, monkeypatch):
    codec = CODECS["Q8_0"]
    calls = []

    def failing_encode(values):
        calls.append(1)
        if len(calls) == 5:
            raise CheckpointError("disk on fire")
        return BlockCodec.encode(codec, values)

    monkeypatch.setattr(codec, "encode", failing_encode)
    with pytest.raises(CheckpointError, match="disk on fire"):
        quantize_to_gguf("tiny-shakespeare", tmp_path / "t.gguf", "Q8_0")
    assert len(calls) == 5 and list(tmp_path.iterdir()) == []
