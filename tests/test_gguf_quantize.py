"""Writing GGUF: the block encoders byte for byte as llama.cpp's ``gguf.quants.quantize``.

The oracle is llama.cpp's own Python package, ``gguf`` (a dev dependency), whose quantisers are
ggml's reference round-to-nearest (``quantize_row_q8_0_ref`` …) written in NumPy.
"""

import numpy as np
import pytest

from llama_np.errors import CheckpointError
from llama_np.weights.codecs import CODECS, WRITTEN_TYPES, BlockCodec

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
