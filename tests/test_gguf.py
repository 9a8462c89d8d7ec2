"""GGUF: llama.cpp's block codecs bit for bit, the header reader against hostile files, the
config and tensor names, and stored GGUF files' logits against Transformers' ``gguf_file=``.

The oracle for the codecs and the metadata is llama.cpp's own Python package, ``gguf`` (a
dev dependency); the logits and token ids are those Transformers 5.23 computes loading the
stored files (tests/reference/make_gguf_reference.py, tests/data/gguf/manifest.json).
"""

import json
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from tolerance import (
    FLOAT32_TOLERANCE,
    assert_close,
    assert_same_token_ids,
)

from llama_np import LlamaForCausalLM, LlamaTokenizer
from llama_np.errors import CheckpointError, ConfigError, TokenizerError
from llama_np.formats import gguf as gguf_format
from llama_np.formats.safetensors import Checkpoint
from llama_np.weights import streaming, workers
from llama_np.weights.codecs import CODECS, BlockCodec

DATA = Path(__file__).resolve().parent / "data"
GGUF_DATA = DATA / "gguf"
MANIFEST = json.loads((GGUF_DATA / "manifest.json").read_text(encoding="utf-8"))
REFERENCE = np.load(GGUF_DATA / "reference.npz")
BLOCK_CODECS = [codec for codec in CODECS.values() if isinstance(codec, BlockCodec)]
# Where each type keeps its float16 scales (d, and m or dmin), by byte offset in a block.
F16_SCALE_OFFSETS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
                     "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


# ---------------------------------------------------------------------------- the codecs


def edge_case_blocks(codec: BlockCodec, rng) -> np.ndarray:
    """Random blocks, then the same with scales set to 0, ±largest float16, float16 subnormals,
    and all-zero / all-one packed bytes: (rows, block_bytes) uint8."""
    random = rng.integers(0, 256, size=(64, codec.block_bytes), dtype=np.uint8)
    cases = [random]
    for scale in (0x0000, 0x8000, 0x7BFF, 0xFBFF, 0x0001, 0x03FF, 0x8001, 0x3C00):
        blocks = random.copy()
        for offset in F16_SCALE_OFFSETS[codec.name]:
            blocks[:, offset:offset + 2] = np.array([scale], dtype="<u2").view(np.uint8)
        cases.append(blocks)
        for fill in (0x00, 0xFF):
            extreme = np.full_like(random[:4], fill)
            for offset in F16_SCALE_OFFSETS[codec.name]:
                extreme[:, offset:offset + 2] = np.array([scale], dtype="<u2").view(np.uint8)
            cases.append(extreme)
    return np.concatenate(cases)


@pytest.mark.parametrize("codec", BLOCK_CODECS, ids=lambda c: c.name)
def test_block_codec_decodes_bit_for_bit_as_gguf_dequantize(codec):
    gguf = pytest.importorskip("gguf")
    blocks = edge_case_blocks(codec, np.random.default_rng(list(CODECS).index(codec.name)))
    rows = blocks.reshape(-1, 2 * codec.block_bytes)  # two blocks a row
    with np.errstate(invalid="ignore", over="ignore"):
        expected = gguf.quants.dequantize(rows, gguf.GGMLQuantizationType[codec.name])
    stored = codec.view(rows.reshape(-1), (rows.shape[0], 2 * codec.block_size))
    decoded = codec.decode(stored)
    assert decoded.shape == expected.shape == (rows.shape[0], 2 * codec.block_size)
    assert decoded.dtype == np.float32
    different = decoded.view(np.uint32) != expected.view(np.uint32)
    assert not different.any(), f"{codec.name}: {different.sum()} numbers differ in their bits"


@pytest.mark.parametrize("codec", BLOCK_CODECS, ids=lambda c: c.name)
def test_block_codec_sizes_are_ggmls(codec):
    gguf = pytest.importorskip("gguf")
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[codec.name]]
    assert (codec.block_size, codec.block_bytes) == (block_size, block_bytes)
    assert codec.ggml_type == int(gguf.GGMLQuantizationType[codec.name])
    assert codec.nbytes((3, 4 * block_size)) == 3 * 4 * block_bytes
    assert codec.bits == block_bytes * 8 / block_size
    with pytest.raises(CheckpointError, match=f"blocks of {block_size}"):
        codec.nbytes((3, block_size + 1))


@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_half_codecs_decode_every_bit_pattern_as_gguf_dequantize(name):
    gguf = pytest.importorskip("gguf")
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    stored = bits.view(CODECS[name].stored_dtype)
    raw = bits.view(np.uint8)  # (256, 512): what a GGUF file holds
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).astype(np.float32)
    decoded = CODECS[name].decode(stored)
    np.testing.assert_array_equal(decoded.view(np.uint32), expected.view(np.uint32))


def test_float_codecs_carry_their_ggml_type_numbers():
    gguf = pytest.importorskip("gguf")
    for name in ("F32", "F16", "BF16", "F64"):
        assert CODECS[name].ggml_type == int(gguf.GGMLQuantizationType[name])


def random_blocks(name: str, rows: int, columns: int, rng) -> np.ndarray:
    """A (rows, columns) matrix of ``name`` as raw blocks: random bytes, with finite float16
    scales of about 1e-2."""
    codec = CODECS[name]
    raw = rng.integers(0, 256, size=(rows, columns // codec.block_size, codec.block_bytes), dtype=np.uint8)
    for offset in F16_SCALE_OFFSETS[name]:
        raw[..., offset:offset + 2] = (rng.uniform(1e-3, 1e-2, size=raw.shape[:2]).astype(np.float16)
                                       .view(np.uint8).reshape(*raw.shape[:2], 2))
    return raw


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q6_K"])
def test_streamed_quantised_product_equals_the_product_with_the_decoded_matrix(name, monkeypatch):
    codec = CODECS[name]
    rng = np.random.default_rng(0)
    rows, columns = 40, 2 * codec.block_size
    raw = random_blocks(name, rows, columns, rng)
    monkeypatch.setattr(workers, "TILE_ELEMENTS", 7 * columns)  # 6 tiles of 7 rows, the last short
    matrix = streaming.StreamedMatrix(raw, name, "w")
    assert matrix.shape == (rows, columns) and matrix.rows_per_tile() == 7
    decoded = codec.decode(raw)
    # In float64, so that the tiling is what is checked, not how a BLAS kernel orders a float32
    # sum of 512 random products (their cancellation moved results by 5e-5 with OpenBLAS's
    # Haswell kernels): the streamed product and the decoded matrix's agree to rounding.
    x = rng.standard_normal((3, 5, columns))
    np.testing.assert_allclose(x @ matrix.T, x @ decoded.astype(np.float64).T, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(matrix[[3, 0, 39]], decoded[[3, 0, 39]])
    np.testing.assert_array_equal(matrix[2, 5:9], decoded[2, 5:9])


@pytest.mark.parametrize("rows_of_x", [1, 5])
@pytest.mark.parametrize("name", [name for name, codec in CODECS.items() if codec.dots is not None])
def test_a_product_without_decoding_gives_the_decoded_products_numbers(name, rows_of_x, monkeypatch):
    codec = CODECS[name]
    rng = np.random.default_rng(1)
    rows, columns = 40, 3 * codec.block_size
    raw = random_blocks(name, rows, columns, rng)
    decoded = codec.decode(raw).astype(np.float64)
    monkeypatch.setattr(workers, "TILE_ELEMENTS", 7 * columns)  # 6 tiles of 7 rows, the last short
    matrix = streaming.StreamedMatrix(raw, name, "w")
    monkeypatch.setattr(codec, "decode_rows", None)  # a float32 x never decodes a tile
    x = rng.standard_normal((rows_of_x, columns)).astype(np.float32)
    # The same sum in another order, in float32, against the exact sum: float32 rounding apart, by
    # the policy's float32 rule (sums of 768 products of up to 63 · 0.01 · |x|: OpenBLAS's
    # Haswell kernels put them 1.4e-5 from the exact value, beyond the repeated-computation 1e-5).
    assert_close(x @ matrix.T, x.astype(np.float64) @ decoded.T, name, tolerance=FLOAT32_TOLERANCE)


def test_an_infinite_scale_in_a_kept_quantised_tensor_is_a_checkpoint_error_naming_it():
    codec = CODECS["Q8_0"]
    raw = np.ones((3, 1, codec.block_bytes), dtype=np.uint8)  # every q = 1
    raw[2, 0, 0:2] = np.array([0x7C00], dtype="<u2").view(np.uint8)  # float16 +inf
    with pytest.raises(CheckpointError, match=r"'x' in m.gguf holds 0 NaN and 32 infinite .* index \(2, 0\)"):
        codec.decode(raw, np.float32, "tensor 'x' in m.gguf")


def test_a_nan_scale_in_a_streamed_quantised_matrix_is_a_checkpoint_error_naming_it():
    codec = CODECS["Q4_0"]
    raw = np.zeros((8, 2, codec.block_bytes), dtype=np.uint8)
    raw[5, 1, 0:2] = np.array([0x7E00], dtype="<u2").view(np.uint8)  # float16 NaN
    matrix = streaming.StreamedMatrix(raw, "Q4_0", "w", source="tensor 'w' in test.gguf")
    with pytest.raises(CheckpointError, match=r"'w' in test.gguf holds 32 NaN and 0 infinite .* index \(5, 32\)"):
        np.ones((1, 64), np.float32) @ matrix.T


# ---------------------------------------------------------------------------- the header


def string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, value_type: int, payload: bytes) -> bytes:
    return string(key) + struct.pack("<I", value_type) + payload


def tensor_info(name: str, ne: list, ggml_type: int, offset: int) -> bytes:
    return (string(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
            + struct.pack("<IQ", ggml_type, offset))


def gguf_bytes(kvs: list[bytes], infos: list[bytes], data: bytes = b"", version: int = 3, alignment: int = 32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos), len(kvs)) + b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % alignment) + data


def small_file() -> bytes:
    """A valid file: an architecture, a string array, and one 2 × 4 F32 tensor."""
    values = np.arange(8, dtype="<f4").tobytes()
    return gguf_bytes([kv("general.architecture", 8, string("llama")),
                       kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + string("a") + string("b"))],
                      [tensor_info("t", [4, 2], 0, 0)], values)


def write(tmp_path, raw: bytes) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(raw)
    return path


def test_a_small_file_reads_with_dims_reversed_into_numpy_shape(tmp_path):
    gguf = gguf_format.read_gguf(write(tmp_path, small_file()))
    assert gguf.version == 3
    assert gguf.metadata == {"general.architecture": "llama", "tokenizer.ggml.tokens": ["a", "b"]}
    info = gguf.tensors["t"]
    assert (info.dtype, info.shape, info.stop - info.start) == ("F32", (2, 4), 32)


def test_all_13_metadata_value_types_read_as_the_gguf_package_writes_them(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "types.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    expected = {"u8": 255, "i8": -128, "u16": 65535, "i16": -32768, "u32": 2**32 - 1, "i32": -2**31,
                "f32": 0.25, "b": True, "s": "héllo", "u64": 2**64 - 1, "i64": -2**63, "f64": 1e-300}
    for key, add in [("u8", writer.add_uint8), ("i8", writer.add_int8), ("u16", writer.add_uint16),
                     ("i16", writer.add_int16), ("u32", writer.add_uint32), ("i32", writer.add_int32),
                     ("f32", writer.add_float32), ("b", writer.add_bool), ("s", writer.add_string),
                     ("u64", writer.add_uint64), ("i64", writer.add_int64), ("f64", writer.add_float64)]:
        add(key, expected[key])
    writer.add_array("numbers", [1, 2, 3])
    writer.add_array("words", ["x", "yz", ""])
    writer.add_array("nested", [[1, 2], [3]])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    metadata = gguf_format.read_gguf(path).metadata
    for key, value in expected.items():
        assert metadata[key] == value and type(metadata[key]) is type(value), key
    np.testing.assert_array_equal(metadata["numbers"], [1, 2, 3])
    assert metadata["words"] == ["x", "yz", ""]
    assert [list(item) for item in metadata["nested"]] == [[1, 2], [3]]
    fields = {key: field for key, field in gguf.GGUFReader(path).fields.items() if not key.startswith("GGUF.")}
    assert set(metadata) == set(fields)
    for key, field in fields.items():
        contents = field.contents()
        ours = metadata[key]
        ours = [int(v) for item in ours for v in item] if key == "nested" else ours  # gguf flattens nesting
        assert np.array_equal(ours, contents) if key in ("numbers", "f32") else ours == contents, key


HOSTILE = {
    "not GGUF": (lambda: b"GGML" + small_file()[4:], "not a GGUF file"),
    "version 1": (lambda: b"GGUF" + struct.pack("<I", 1) + small_file()[8:], "version 1"),
    "big-endian": (lambda: b"GGUF" + struct.pack(">I", 3) + small_file()[8:], "big-endian"),
    "huge tensor count": (lambda: b"GGUF" + struct.pack("<IQQ", 3, 2**62, 0), "tensor_count is 4611686018427387904"),
    "huge string": (lambda: gguf_bytes([struct.pack("<Q", 2**60) + b"key"], []), "length of the key of metadata entry 0"),
    "huge array": (lambda: gguf_bytes([kv("a", 9, struct.pack("<IQ", 12, 2**40))], []), "length of metadata key 'a'"),
    "unknown value type": (lambda: gguf_bytes([kv("a", 13, b"")], []), "value type 13"),
    "bool 2": (lambda: gguf_bytes([kv("a", 7, b"\x02")], []), "BOOL of value 2"),
    "arrays too deep": (lambda: gguf_bytes([kv("a", 9, struct.pack("<IQ", 9, 1) * 4 + struct.pack("<IQ", 0, 0))], []),
                        "nests arrays 4 deep"),
    "duplicate key": (lambda: gguf_bytes([kv("a", 0, b"\x01"), kv("a", 0, b"\x02")], []), "'a' appears twice"),
    "not UTF-8": (lambda: gguf_bytes([kv("a", 8, struct.pack("<Q", 1) + b"\xff")], []), "not UTF-8"),
    "alignment 24": (lambda: gguf_bytes([kv("general.alignment", 4, struct.pack("<I", 24))], []), "power of two"),
    "unknown ggml type": (lambda: gguf_bytes([], [tensor_info("t", [32], 10, 0)], bytes(84)), "ggml type 10"),
    "5 dims": (lambda: gguf_bytes([], [tensor_info("t", [1] * 5, 0, 0)], bytes(4)), "n_dims 5"),
    "misaligned": (lambda: gguf_bytes([], [tensor_info("t", [1], 0, 4)], bytes(8)), "not a multiple of the alignment 32"),
    "past the end": (lambda: gguf_bytes([], [tensor_info("t", [16], 0, 0)], bytes(60)), "past the end of the file"),
    "overlap": (lambda: gguf_bytes([], [tensor_info("t", [16], 0, 0), tensor_info("u", [16], 0, 32)], bytes(96)),
                "'t' and 'u' overlap"),
    "duplicate tensor": (lambda: gguf_bytes([], [tensor_info("t", [8], 0, 0), tensor_info("t", [8], 0, 32)], bytes(64)),
                         "'t' appears twice"),
    "row not a multiple of the block": (lambda: gguf_bytes([], [tensor_info("t", [48, 1], 8, 0)], bytes(68)),
                                        "ne\\[0\\] = 48"),
    "absurd dimensions": (lambda: gguf_bytes([], [tensor_info("t", [2**40, 2**40], 0, 0)]), "more numbers than"),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_a_hostile_file_is_one_checkpoint_error_naming_the_file_and_the_field(tmp_path, case):
    make, message = HOSTILE[case]
    path = write(tmp_path, make())
    with pytest.raises(CheckpointError, match=message) as raised:
        gguf_format.read_gguf(path)
    assert str(path) in str(raised.value)


def test_every_truncation_and_every_flipped_byte_of_a_header_is_a_checkpoint_error_or_a_read(tmp_path):
    raw = small_file()
    for cut in range(len(raw)):
        with pytest.raises(CheckpointError):
            gguf_format.read_gguf(write(tmp_path, raw[:cut]))
    rng = np.random.default_rng(0)
    for position in range(len(raw) - 32):  # the header, not the tensor's bytes
        flipped = bytearray(raw)
        flipped[position] ^= int(rng.integers(1, 256))
        try:
            gguf_format.read_gguf(write(tmp_path, bytes(flipped)))
        except CheckpointError:
            pass


# ---------------------------------------------------------------------------- config and names


def test_config_comes_from_the_llama_keys_as_the_fixtures_config():
    config, checkpoint = gguf_format.open_gguf_checkpoint(GGUF_DATA / "gqa_f32-F32.gguf")
    fixture = json.loads((DATA / "fixtures" / "gqa_f32" / "config.json").read_text())
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size",
                  "tie_word_embeddings"):
        assert getattr(config, field) == fixture[field], field
    assert config.rms_norm_eps == float(np.float32(fixture["rms_norm_eps"]))  # stored as FLOAT32
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert checkpoint.layout == "GGUF (llama.cpp)"


@pytest.mark.parametrize("source", ["gqa_f32", "mqa_tied_f16"])
def test_an_f32_file_holds_the_fixtures_tensors_with_q_and_k_rows_permuted_back(source):
    _, checkpoint = gguf_format.open_gguf_checkpoint(GGUF_DATA / f"{source}-F32.gguf")
    fixture = Checkpoint.open(DATA / "fixtures" / source)
    assert set(checkpoint) == set(fixture)
    for name in fixture:
        np.testing.assert_array_equal(checkpoint[name].numpy(), fixture[name].numpy(), err_msg=name)


def test_embeddings_are_tied_when_output_weight_is_absent():
    config, checkpoint = gguf_format.open_gguf_checkpoint(GGUF_DATA / "mqa_tied_f16-Q8_0.gguf")
    assert config.tie_word_embeddings and "lm_head.weight" not in checkpoint
    assert checkpoint["model.embed_tokens.weight"].dtype == "Q8_0"


def test_tensor_names_map_to_hugging_faces():
    assert gguf_format.hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert gguf_format.hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert gguf_format.hf_name("output.weight") == "lm_head.weight"
    assert gguf_format.hf_name("rope_freqs.weight") == "rope_freqs.weight"


def llama_header(**keys) -> list[bytes]:
    """Metadata of a small Llama (u32 values; a float32 where the value is a float; None leaves a key out)."""
    values = {"block_count": 1, "embedding_length": 64, "feed_forward_length": 128, "attention.head_count": 4,
              "vocab_size": 32}
    values.update(keys)
    return [kv("general.architecture", 8, string("llama"))] + [
        kv(f"llama.{key}", 6, struct.pack("<f", value)) if isinstance(value, float) else kv(f"llama.{key}", 4, struct.pack("<I", value))
        for key, value in values.items() if value is not None]


def test_a_header_missing_a_llama_key_or_inconsistent_is_an_error_naming_the_file_and_key(tmp_path):
    path = write(tmp_path, gguf_bytes(llama_header(**{"attention.head_count": 3}), []))
    with pytest.raises(ConfigError, match=r"model.gguf \(its llama.\* metadata\): num_attention_heads=3 does not divide"):
        gguf_format.open_gguf_checkpoint(path)  # 64 is not 3 heads of a whole head_dim
    path = write(tmp_path, gguf_bytes(llama_header(**{"attention.head_count": None}), []))
    with pytest.raises(CheckpointError, match="no metadata key 'llama.attention.head_count'"):
        gguf_format.open_gguf_checkpoint(path)
    path = write(tmp_path, gguf_bytes(llama_header(**{"attention.key_length": 16, "attention.value_length": 32}), []))
    with pytest.raises(CheckpointError, match="value_length is 32 but the key length is 16"):
        gguf_format.open_gguf_checkpoint(path)


def test_rope_scaling_linear_is_read_and_an_unknown_one_refused(tmp_path):
    scaling = [kv("llama.rope.scaling.type", 8, string("linear")), kv("llama.rope.scaling.factor", 6, struct.pack("<f", 4.0))]
    config, _ = gguf_format.open_gguf_checkpoint(write(tmp_path, gguf_bytes(llama_header() + scaling, [])))
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 4.0
    yarn = [kv("llama.rope.scaling.type", 8, string("yarn"))]
    with pytest.raises(CheckpointError, match="rope.scaling.type is 'yarn'"):
        gguf_format.open_gguf_checkpoint(write(tmp_path, gguf_bytes(llama_header() + yarn, [])))


def test_two_tensors_with_one_hugging_face_name_are_refused(tmp_path):
    infos = [tensor_info("blk.0.attn_norm.weight", [64], 0, 0),
             tensor_info("model.layers.0.input_layernorm.weight", [64], 0, 256)]
    path = write(tmp_path, gguf_bytes(llama_header(), infos, bytes(512)))
    with pytest.raises(CheckpointError, match="'blk.0.attn_norm.weight' and 'model.layers.0.input_layernorm.weight'"):
        gguf_format.open_gguf_checkpoint(path)


def test_another_architecture_is_refused_by_name(tmp_path):
    path = write(tmp_path, gguf_bytes([kv("general.architecture", 8, string("qwen2"))], []))
    with pytest.raises(CheckpointError, match="'qwen2' model"):
        gguf_format.open_gguf_checkpoint(path)


# ---------------------------------------------------------------------------- against Transformers


@pytest.mark.parametrize("name", sorted(MANIFEST["files"]))
def test_logits_and_greedy_ids_match_transformers_loading_the_gguf_file(name):
    stem = name[: -len(".gguf")]
    source = stem.rsplit("-", 1)[0]  # the name of its input ids in reference.npz
    model = LlamaForCausalLM.from_pretrained(GGUF_DATA / name)
    assert_close(model(REFERENCE[f"{source}/input_ids"]).logits, REFERENCE[f"{stem}/logits"],
                 f"{name} logits", FLOAT32_TOLERANCE)
    generated = model.generate(REFERENCE[f"{source}/prompt_ids"], max_new_tokens=8)
    assert_same_token_ids(generated, REFERENCE[f"{stem}/generated"], f"{name} greedy ids")


def test_gguf_file_names_the_file_inside_a_directory_as_in_transformers():
    by_path = LlamaForCausalLM.from_pretrained(GGUF_DATA / "gqa_f32-Q4_0.gguf")
    by_directory = LlamaForCausalLM.from_pretrained(GGUF_DATA, gguf_file="gqa_f32-Q4_0.gguf")
    input_ids = REFERENCE["gqa_f32/input_ids"]
    np.testing.assert_array_equal(by_path(input_ids).logits, by_directory(input_ids).logits)


@pytest.mark.parametrize("name, q_type, k_type", [("tiny-shakespeare-Q4_0.gguf", "Q4_0", "Q4_0"),
                                                  ("kquants-Q4_K_M.gguf", "Q4_K", "Q4_K"),
                                                  ("gqa_f32-Q5_1.gguf", "Q5_1", "Q5_1")])
def test_a_streamed_quantised_model_keeps_its_matrices_quantised_and_gives_transformers_logits(name, q_type, k_type):
    stem = name[: -len(".gguf")]
    streamed = LlamaForCausalLM.from_pretrained(GGUF_DATA / name, keep_widened=False)
    logits = streamed(REFERENCE[f"{stem.rsplit('-', 1)[0]}/input_ids"]).logits
    for projection, codec_name in (("q_proj", q_type), ("k_proj", k_type)):
        matrix = streamed.weights[f"model.layers.0.self_attn.{projection}.weight"]
        assert isinstance(matrix, streaming.StreamedMatrix) and matrix.storage_dtype == codec_name
        assert matrix.stored.dtype == np.uint8
        assert matrix.stored.nbytes == CODECS[codec_name].nbytes(matrix.shape)
    assert_close(logits, REFERENCE[f"{stem}/logits"], f"streamed {name}", FLOAT32_TOLERANCE)


# ---------------------------------------------------------------------------- the tokenizer


TEXTS = MANIFEST["texts"]
LEADING_SPACES = 2  # TEXTS[2] starts with two spaces: see the test below


@pytest.mark.parametrize("index", [i for i in range(len(TEXTS)) if i != LEADING_SPACES])
def test_the_tokenizer_of_a_gguf_file_gives_transformers_ids(index):
    tokenizer = LlamaTokenizer.from_pretrained(GGUF_DATA / "tiny-shakespeare-Q4_0.gguf")
    assert tokenizer(TEXTS[index])["input_ids"] == REFERENCE[f"tokenizer/{index}"].tolist()


def test_leading_spaces_are_merged_as_sentencepiece_merges_them():
    """For "  two …" sentencepiece sees "▁▁▁two" (its dummy prefix and the two spaces) and gives
    "▁▁", "▁two"; Transformers 5.23 gives "▁", "▁two", one space fewer — for the bundled
    tokenizer.model as well as for the GGUF file, so this is its tokenizers-backed LlamaTokenizer,
    not GGUF. llama_np follows sentencepiece (and Transformers 4.45.2's slow LlamaTokenizer,
    which tests/test_tokenizer.py pins)."""
    text = TEXTS[LEADING_SPACES]
    tokenizer = LlamaTokenizer.from_pretrained(GGUF_DATA, gguf_file="tiny-shakespeare-Q4_0.gguf")
    ids = tokenizer(text)["input_ids"]
    assert ids == LlamaTokenizer.from_pretrained("tiny-shakespeare", legacy=False)(text)["input_ids"]
    transformers_ids = REFERENCE[f"tokenizer/{LEADING_SPACES}"].tolist()
    assert tokenizer.convert_ids_to_tokens(ids[1:3]) == ["▁▁", "▁two"]
    assert tokenizer.convert_ids_to_tokens(transformers_ids[1:3]) == ["▁", "▁two"]
    assert ids[3:] == transformers_ids[3:]


@pytest.mark.parametrize("legacy", [True, False])
def test_the_gguf_vocabulary_encodes_and_decodes_as_the_tokenizer_model_it_came_from(legacy):
    texts = json.loads((DATA / "tokenizer" / "encodings.json").read_text(encoding="utf-8"))["texts"] + TEXTS
    from_gguf = LlamaTokenizer.from_pretrained(GGUF_DATA / "tiny-shakespeare-Q4_0.gguf", legacy=legacy)
    original = LlamaTokenizer.from_pretrained("tiny-shakespeare", legacy=legacy)
    assert from_gguf.get_vocab() == original.get_vocab()
    for text in texts:
        ids = original(text)["input_ids"]
        assert from_gguf(text)["input_ids"] == ids, text
        assert from_gguf.decode(ids) == original.decode(ids), text


def test_a_small_vocabulary_with_a_chat_template_becomes_a_working_tokenizer(tmp_path):
    tokens = ["<unk>", "<s>", "</s>", "▁", "a", "b", "▁a", "ab"]
    array = lambda item_type, raw, count: struct.pack("<IQ", item_type, count) + raw
    path = write(tmp_path, gguf_bytes(llama_header() + [
        kv("tokenizer.ggml.model", 8, string("llama")),
        kv("tokenizer.ggml.tokens", 9, array(8, b"".join(string(t) for t in tokens), len(tokens))),
        kv("tokenizer.ggml.scores", 9, array(6, np.array([0, 0, 0, -3, -4, -5, -1, -2], "<f4").tobytes(), 8)),
        kv("tokenizer.ggml.token_type", 9, array(5, np.array([2, 3, 3, 1, 1, 1, 1, 1], "<i4").tobytes(), 8)),
        kv("tokenizer.ggml.bos_token_id", 4, struct.pack("<I", 1)),
        kv("tokenizer.ggml.eos_token_id", 4, struct.pack("<I", 2)),
        kv("tokenizer.chat_template", 8, string("{{ messages[0]['content'] }}")),
    ], []))
    tokenizer = LlamaTokenizer.from_pretrained(path)
    assert tokenizer.chat_template == "{{ messages[0]['content'] }}"
    assert tokenizer.convert_ids_to_tokens(tokenizer("aab")["input_ids"]) == ["<s>", "▁a", "ab"]
    assert tokenizer.decode(tokenizer("aab ba")["input_ids"], skip_special_tokens=True) == "aab ba"


def test_a_gguf_file_without_a_llama_vocabulary_is_a_tokenizer_error(tmp_path):
    path = write(tmp_path, gguf_bytes([kv("general.architecture", 8, string("llama")),
                                       kv("tokenizer.ggml.model", 8, string("gpt2"))], []))
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model is 'gpt2'"):
        LlamaTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------- the fast tokenizer


TINY_GGUF = GGUF_DATA / "tiny-shakespeare-Q4_0.gguf"
# Beside the stored texts: newlines and tabs, characters the 2000-piece vocabulary lacks (spelled
# as <0xNN> byte pieces), special-token strings inside text, the empty string.
AWKWARD = ["\n", "a\n\nb\n", "x\ty", "🙂", "x 🙂 y", "é", "日本語テキスト", "", "Hello <s>.",
           "a</s>b", "<unk>x", "ROMEO:\nTwo  spaces, then   three."]
# Texts that start with a space, where Metaspace (Transformers' rule) and sentencepiece differ.
LEADING_SPACE = ["  two", " lead", "   ", " ▁a", "  <s>  x  ", TEXTS[LEADING_SPACES]]


@pytest.fixture(scope="module")
def fast_gguf():
    pytest.importorskip("tokenizers")
    from llama_np import LlamaTokenizerFast

    return LlamaTokenizerFast.from_pretrained(TINY_GGUF)


@pytest.mark.parametrize("index", range(len(TEXTS)))
def test_the_fast_tokenizer_of_a_gguf_file_gives_transformers_ids(fast_gguf, index):
    """Every stored text, the leading spaces of TEXTS[2] included: Transformers' tokenizer of a
    GGUF file is the tokenizers library's, as this one is."""
    assert fast_gguf(TEXTS[index])["input_ids"] == REFERENCE[f"tokenizer/{index}"].tolist()


def test_the_fast_tokenizer_of_a_gguf_file_encodes_and_decodes_as_the_slow_one(fast_gguf):
    slow = LlamaTokenizer.from_pretrained(TINY_GGUF)
    texts = [text for i, text in enumerate(TEXTS) if i != LEADING_SPACES] + AWKWARD
    byte_pieces = 0
    for text in texts:
        ids = slow(text)["input_ids"]
        assert fast_gguf(text)["input_ids"] == ids, text
        assert fast_gguf.decode(ids) == slow.decode(ids), text
        assert fast_gguf.decode(ids, skip_special_tokens=True) == slow.decode(ids, skip_special_tokens=True), text
        if not any(token in text for token in slow.all_special_tokens):
            assert fast_gguf.decode(ids, skip_special_tokens=True) == text
        byte_pieces += sum(token.startswith("<0x") for token in fast_gguf.tokenize(text))
    assert byte_pieces >= 10  # the byte fallback was exercised


def test_the_fast_tokenizer_of_a_gguf_file_is_the_tokenizer_model_it_came_from_converted_with_legacy_false(fast_gguf):
    """The whole tokenizer.json (tests/test_tokenizer_fast.py pins the conversion against
    Transformers' converter); texts starting with a space follow Metaspace, which puts no "▁" in
    front of a text that already starts with one, where sentencepiece does."""
    from llama_np import LlamaTokenizerFast

    original = LlamaTokenizerFast(vocab_file=LlamaTokenizer.from_pretrained("tiny-shakespeare").vocab_file,
                                  legacy=False)
    assert json.loads(fast_gguf.backend_tokenizer.to_str()) == json.loads(original.backend_tokenizer.to_str())
    slow = LlamaTokenizer.from_pretrained(TINY_GGUF)
    for text in LEADING_SPACE:
        ids = fast_gguf(text)["input_ids"]
        assert ids == original(text)["input_ids"], text
        fast_spaces, slow_spaces = ("".join(t.tokenize(text)).count("▁") for t in (fast_gguf, slow))
        assert fast_spaces == slow_spaces - 1, text  # one "▁" fewer than sentencepiece
        assert fast_gguf.decode(ids, skip_special_tokens=True) == slow.decode(ids, skip_special_tokens=True)
    assert (fast_gguf.bos_token, fast_gguf.eos_token, fast_gguf.unk_token, fast_gguf.pad_token) == ("<s>", "</s>", "<unk>", None)
    assert (fast_gguf.add_bos_token, fast_gguf.add_eos_token, fast_gguf.legacy) == (True, False, False)


def test_gguf_file_names_the_file_for_the_fast_tokenizer_as_in_transformers(fast_gguf):
    from llama_np import LlamaTokenizerFast

    also = LlamaTokenizerFast.from_pretrained(GGUF_DATA, gguf_file=TINY_GGUF.name)
    assert json.loads(also.backend_tokenizer.to_str()) == json.loads(fast_gguf.backend_tokenizer.to_str())
    assert [also(text)["input_ids"] for text in TEXTS] == [REFERENCE[f"tokenizer/{i}"].tolist() for i in range(len(TEXTS))]
    overridden = LlamaTokenizerFast.from_pretrained(TINY_GGUF, add_eos_token=True)
    assert overridden("Hello world")["input_ids"][-1] == overridden.eos_token_id == 2


def test_save_pretrained_of_the_fast_tokenizer_of_a_gguf_file_loads_back_the_same(fast_gguf, tmp_path):
    from llama_np import LlamaTokenizerFast
    from llama_np.text.tokenizer_fast import read_gguf_vocabulary

    paths = fast_gguf.save_pretrained(tmp_path)
    assert sorted(Path(p).name for p in paths) == ["special_tokens_map.json", "tokenizer.json",
                                                   "tokenizer.model", "tokenizer_config.json"]
    # the vocabulary as a sentencepiece model, not a copy of the GGUF file it came from
    assert (tmp_path / "tokenizer.model").read_bytes() == read_gguf_vocabulary(TINY_GGUF)[0]
    assert json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))["legacy"] is False
    fast, slow = LlamaTokenizerFast.from_pretrained(tmp_path), LlamaTokenizer.from_pretrained(tmp_path)
    slow_of_gguf = LlamaTokenizer.from_pretrained(TINY_GGUF)
    for text in TEXTS + AWKWARD + LEADING_SPACE:
        ids = fast_gguf(text)["input_ids"]
        assert fast(text)["input_ids"] == ids, text
        assert fast.decode(ids) == fast_gguf.decode(ids), text
        assert slow(text)["input_ids"] == slow_of_gguf(text)["input_ids"], text


def test_a_gguf_file_without_a_llama_vocabulary_is_a_tokenizer_error_naming_it_for_the_fast_tokenizer(tmp_path):
    pytest.importorskip("tokenizers")
    from llama_np import LlamaTokenizerFast

    path = write(tmp_path, gguf_bytes([kv("general.architecture", 8, string("llama")),
                                       kv("tokenizer.ggml.model", 8, string("gpt2"))], []))
    with pytest.raises(TokenizerError, match=re.escape(f"{path}: tokenizer.ggml.model is 'gpt2'")):
        LlamaTokenizerFast.from_pretrained(path)
    with pytest.raises(TokenizerError, match=re.escape(f"{path}: tokenizer.ggml.model is 'gpt2'")):
        LlamaTokenizerFast.from_pretrained(tmp_path, gguf_file=path.name)
    no_tokenizer = GGUF_DATA / "gqa_f32-Q4_0.gguf"
    with pytest.raises(TokenizerError, match=re.escape(f"{no_tokenizer}: holds no tokenizer")):
        LlamaTokenizerFast.from_pretrained(no_tokenizer)
    truncated = write(tmp_path, small_file()[:20])  # the reader's CheckpointError, as a TokenizerError
    with pytest.raises(TokenizerError, match=re.escape(str(truncated))):
        LlamaTokenizerFast.from_pretrained(truncated)


def test_without_the_tokenizers_package_the_fast_tokenizer_of_a_gguf_file_names_the_extra(monkeypatch):
    from llama_np import LlamaTokenizerFast

    monkeypatch.setitem(sys.modules, "tokenizers", None)  # what an environment without it looks like
    with pytest.raises(TokenizerError, match=re.escape("needs the 'tokenizers' package: pip install 'llama-np[fast]'")):
        LlamaTokenizerFast.from_pretrained(TINY_GGUF)
    assert LlamaTokenizer.from_pretrained(TINY_GGUF)("Hello world")["input_ids"] == REFERENCE["tokenizer/0"].tolist()


# ---------------------------------------------------------------------------- the command line


def run_cli(capsys, *argv):
    from llama_np.cli.main import main  # the command line, only for these tests

    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_inspect_shows_each_tensor_type_with_its_bits_per_weight_and_bytes(capsys):
    path = GGUF_DATA / "tiny-shakespeare-Q4_0.gguf"
    status, out, err = run_cli(capsys, "inspect", "--model", path, "--seq-len", 8)
    assert status == 0, err
    assert "layout           GGUF (llama.cpp)" in out
    _, checkpoint = gguf_format.open_gguf_checkpoint(path)
    q4_bytes = sum(t.nbytes for t in checkpoint.tensors.values() if t.dtype == "Q4_0")
    assert "  Q4_0       4.5 bits/weight   26 tensors" in out and f"{q4_bytes:,} bytes" in out
    assert "  F16         16 bits/weight    4 tensors" in out  # the four down_proj, rows of 688
    assert "GGUF             version 3" in out


def test_generate_runs_a_gguf_file_with_its_own_tokenizer_and_the_transformers_ids(capsys):
    prompt_ids = REFERENCE["tiny-shakespeare/prompt_ids"][0].tolist()
    tokenizer = LlamaTokenizer.from_pretrained(GGUF_DATA / "tiny-shakespeare-Q4_0.gguf")
    prompt = tokenizer.decode(prompt_ids[1:] if prompt_ids[0] == 1 else prompt_ids)
    status, out, err = run_cli(capsys, "generate", prompt, "--model", GGUF_DATA / "tiny-shakespeare-Q4_0.gguf",
                               "--greedy", "--max-new-tokens", 4)
    assert status == 0, err
    model = LlamaForCausalLM.from_pretrained(GGUF_DATA / "tiny-shakespeare-Q4_0.gguf")
    ids = tokenizer(prompt, return_tensors="np")["input_ids"]
    expected = tokenizer.decode(model.generate(ids, max_new_tokens=4)[0, ids.shape[1]:])
    assert expected.strip() and expected.strip() in out


def test_chat_runs_a_gguf_file(capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Good morrow\n"))
    status, _, err = run_cli(capsys, "chat", "--model", GGUF_DATA / "tiny-shakespeare-Q4_0.gguf",
                             "--greedy", "--max-new-tokens", 3, "--speed")
    assert status == 0, err
    assert "has no chat_template" in err and "3 new tokens" in err


def test_a_gguf_file_with_no_tokenizer_says_so(capsys):
    status, _, err = run_cli(capsys, "generate", "hi", "--model", GGUF_DATA / "gqa_f32-Q4_0.gguf")
    assert status == 2 and "gqa_f32-Q4_0.gguf: holds no tokenizer (no tokenizer.ggml.model key)" in err
