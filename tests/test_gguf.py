"""GGUF: llama.cpp's block codecs, bit for bit against its own Python package, ``gguf`` (a dev
dependency), and streamed products of quantised matrices.
"""


import numpy as np
import pytest

from llama_np.errors import CheckpointError
from llama_np.weights import streaming, workers
from llama_np.weights.codecs import CODECS, BlockCodec
from tolerance import REPEATED_TOLERANCE, assert_close

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


def test_float_codecs_carry_their_ggml_type_numbers():
    gguf = pytest.importorskip("gguf")
    for name in ("F32", "F16", "BF16", "F64"):
        assert CODECS[name].ggml_type == int(gguf.GGMLQuantizationType[name])


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q6_K"])
def test_streamed_quantised_product_equals_the_product_with_the_decoded_matrix(name, monkeypatch):
    codec = CODECS[name]
    rng = np.random.default_rng(0)
    rows, columns = 40, 2 * codec.block_size
    raw = rng.integers(0, 256, size=(rows, columns // codec.block_size, codec.block_bytes), dtype=np.uint8)
    for offset in F16_SCALE_OFFSETS[name]:  # finite scales of about 1e-2
        raw[..., offset:offset + 2] = (rng.uniform(1e-3, 1e-2, size=raw.shape[:2]).astype(np.float16)
                                       .view(np.uint8).reshape(*raw.shape[:2], 2))
    monkeypatch.setattr(workers, "TILE_ELEMENTS", 7 * columns)  # 6 tiles of 7 rows, the last short
    matrix = streaming.StreamedMatrix(raw, name, "w")
    assert matrix.shape == (rows, columns) and matrix.rows_per_tile() == 7
    x = rng.standard_normal((3, 5, columns)).astype(np.float32)
    decoded = codec.decode(raw)
    assert_close(x @ matrix.T, x @ decoded.T, f"streamed {name} product", REPEATED_TOLERANCE)
    np.testing.assert_array_equal(matrix[[3, 0, 39]], decoded[[3, 0, 39]])
    np.testing.assert_array_equal(matrix[2, 5:9], decoded[2, 5:9])


def test_a_nan_scale_in_a_streamed_quantised_matrix_is_a_checkpoint_error_naming_it():
    codec = CODECS["Q4_0"]
    raw = np.zeros((8, 2, codec.block_bytes), dtype=np.uint8)
    raw[5, 1, 0:2] = np.array([0x7E00], dtype="<u2").view(np.uint8)  # float16 NaN
    matrix = streaming.StreamedMatrix(raw, "Q4_0", "w", source="tensor 'w' in test.gguf")
    with pytest.raises(CheckpointError, match="'w' in test.gguf holds 32 NaN"):
        np.ones((1, 64), np.float32) @ matrix.T
