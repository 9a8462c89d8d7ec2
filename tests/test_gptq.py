"""GPTQ (llama_np/weights/gptq.py): smaller layer-output error than round-to-nearest on correlated
inputs, round-to-nearest itself when the Hessian is a multiple of the identity, blocks that the
Q4_0/Q4_1 decoders read, act-order's permutation undone, and a GGUF file written with it."""

import numpy as np
import pytest

from llama_np import LlamaForCausalLM, LlamaTokenizer
from llama_np.errors import InputError
from llama_np.formats.gguf_writer import calibration_inputs, quantize_to_gguf
from llama_np.formats.gguf import read_gguf
from llama_np.weights import gptq, quants
from llama_np.weights.codecs import Q4_0, Q4_1, Q8_0

CODECS = {Q4_0: (quants.q4_0, quants.encode_q4_0), Q4_1: (quants.q4_1, quants.encode_q4_1)}


def correlated_layer(seed=0, rows=48, columns=128, samples=1024):
    """A weight (rows, columns) and inputs (samples, columns) whose columns are correlated and of
    unequal size, as a real layer's are: the case GPTQ is for."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((rows, columns)).astype(np.float32)
    mixing = np.eye(columns) + 0.3 * rng.standard_normal((columns, columns))
    inputs = (rng.standard_normal((samples, columns)) @ mixing * rng.uniform(0.2, 3, columns)).astype(np.float32)
    return weight, inputs


def decoded(blocks, codec, shape):
    return CODECS[codec][0](blocks).reshape(shape)


@pytest.mark.parametrize("act_order", [False, True], ids=["in_order", "act_order"])
@pytest.mark.parametrize("codec", list(CODECS), ids=lambda c: c.name)
def test_gptq_output_error_is_below_round_to_nearest(codec, act_order):
    weight, inputs = correlated_layer()
    rtn = decoded(CODECS[codec][1](weight.reshape(-1, 32)), codec, weight.shape)
    ours = decoded(gptq.gptq_quantize(weight, inputs, codec, act_order=act_order), codec, weight.shape)
    rtn_error, gptq_error = gptq.layer_error(weight, rtn, inputs), gptq.layer_error(weight, ours, inputs)
    assert gptq_error < 0.85 * rtn_error, f"GPTQ {gptq_error:.4f} against round-to-nearest {rtn_error:.4f}"


@pytest.mark.parametrize("act_order", [False, True], ids=["in_order", "act_order"])
@pytest.mark.parametrize("codec", list(CODECS), ids=lambda c: c.name)
def test_gptq_with_an_identity_hessian_is_round_to_nearest_byte_for_byte(codec, act_order):
    weight, _ = correlated_layer(rows=16, columns=64)
    identity = np.eye(64, dtype=np.float32)  # H = 2I/64: no column's error reaches another
    blocks = gptq.gptq_quantize(weight, identity, codec, act_order=act_order)
    np.testing.assert_array_equal(blocks, CODECS[codec][1](weight.reshape(-1, 32)))


@pytest.mark.parametrize("codec", list(CODECS), ids=lambda c: c.name)
def test_gptq_blocks_decode_with_the_codec_as_sixteen_levels_a_block(codec):
    weight, inputs = correlated_layer(seed=1, rows=8, columns=64)
    blocks = gptq.gptq_quantize(weight, inputs, codec)
    assert blocks.shape == (8 * 2, codec.block_bytes) and blocks.dtype == np.uint8
    values = codec.decode_blocks(blocks)  # (16, 32)
    np.testing.assert_array_equal(values, decoded(blocks, codec, (16, 32)))
    d = quants.f16(blocks[:, 0:2])
    low = quants.f16(blocks[:, 2:4]) if codec is Q4_1 else -8 * d
    levels = (values - low) / d  # the integers 0..15 the nibbles hold
    np.testing.assert_allclose(levels, np.round(levels), rtol=0, atol=1e-3)
    assert levels.min() > -1e-3 and levels.max() < 15 + 1e-3
    assert gptq.layer_error(weight, values.reshape(weight.shape), inputs) < 0.2


@pytest.mark.parametrize("codec", list(CODECS), ids=lambda c: c.name)
def test_act_order_permutes_columns_and_puts_them_back(codec):
    """Independent inputs of unequal size: H is diagonal but not the identity, so act-order
    visits the columns in a real permutation (largest input first) while no error crosses
    columns; put back in the file's order the blocks must be round-to-nearest's, byte for byte."""
    weight, _ = correlated_layer(seed=2, rows=8, columns=64)
    sizes = np.random.default_rng(3).permutation(np.linspace(0.1, 4, 64)).astype(np.float32)
    inputs = np.diag(sizes)  # H = 2 diag(sizes²) / 64
    order = np.argsort(-np.diag(gptq.hessian(inputs)), kind="stable")
    assert not np.array_equal(order, np.arange(64))
    blocks = gptq.gptq_quantize(weight, inputs, codec, act_order=True)
    np.testing.assert_array_equal(blocks, CODECS[codec][1](weight.reshape(-1, 32)))


def test_gptq_refuses_other_types_and_partial_blocks():
    weight, inputs = correlated_layer(rows=4, columns=64)
    with pytest.raises(InputError, match="Q4_0 or Q4_1"):
        gptq.gptq_quantize(weight, inputs, Q8_0)
    with pytest.raises(InputError, match="whole blocks of 32"):
        gptq.gptq_quantize(weight[:, :48], inputs[:, :48], Q4_0)


def test_a_gptq_file_of_the_bundled_model_is_a_q4_0_file_closer_to_the_original(tmp_path):
    model = LlamaForCausalLM.from_pretrained("tiny-shakespeare")
    tokenizer = LlamaTokenizer.from_pretrained("tiny-shakespeare")
    ids = np.array([tokenizer.encode("Friends, Romans, countrymen, lend me your ears; " * 12)[:128]])
    calibration = calibration_inputs(model, ids)
    assert calibration["model.layers.0.self_attn.o_proj.weight"].shape == (128, 256)
    gptq_file = quantize_to_gguf("tiny-shakespeare", tmp_path / "gptq.gguf", "Q4_0", calibration=calibration)
    rtn_file = quantize_to_gguf("tiny-shakespeare", tmp_path / "rtn.gguf", "Q4_0")
    assert gptq_file.types() == rtn_file.types() and gptq_file.bytes == rtn_file.bytes
    assert read_gguf(tmp_path / "gptq.gguf").tensors["blk.0.attn_q.weight"].dtype == Q4_0.name
    reference = model(ids).logits
    errors = {path: np.abs(LlamaForCausalLM.from_pretrained(path)(ids).logits - reference).mean()
              for path in (tmp_path / "gptq.gguf", tmp_path / "rtn.gguf")}
    assert errors[tmp_path / "gptq.gguf"] < errors[tmp_path / "rtn.gguf"], errors


def test_quantize_verb_writes_a_gptq_file_and_refuses_gptq_for_other_types(tmp_path, capsys):
    from llama_np.cli.main import main  # the command line, only for this test

    text = tmp_path / "calibration.txt"
    text.write_text("Friends, Romans, countrymen, lend me your ears;\nI come to bury Caesar, not to praise him.\n" * 8,
                    encoding="utf-8")
    status = main(["quantize", "tiny-shakespeare", str(tmp_path / "gptq.gguf"), "--type", "Q4_1",
                   "--gptq", str(text), "--act-order"])
    captured = capsys.readouterr()
    assert status == 0 and "GPTQ calibration:" in captured.err and "Q4_1 26" in captured.out
    assert read_gguf(tmp_path / "gptq.gguf").tensors["blk.3.ffn_up.weight"].dtype == Q4_1.name
    status = main(["quantize", "tiny-shakespeare", str(tmp_path / "q8.gguf"), "--type", "Q8_0", "--gptq", str(text)])
    captured = capsys.readouterr()
    assert status == 2 and "--gptq writes Q4_0 or Q4_1 blocks; --type is Q8_0" in captured.err
    assert not (tmp_path / "q8.gguf").exists()


def test_lazy_batches_give_the_column_by_column_result():
    """Applying the error updates 32 columns at a time or 128 at a time is the same algebra;
    the decoded weights agree to float rounding (a rare tie may flip one integer)."""
    weight, inputs = correlated_layer(seed=4, rows=16, columns=128)
    one_block = decoded(gptq.gptq_quantize(weight, inputs, Q4_0, block_size=32), Q4_0, weight.shape)
    whole = decoded(gptq.gptq_quantize(weight, inputs, Q4_0, block_size=128), Q4_0, weight.shape)
    assert np.mean(one_block == whole) > 0.999
    assert abs(gptq.layer_error(weight, one_block, inputs) - gptq.layer_error(weight, whole, inputs)) < 1e-3


def test_a_column_whose_input_is_always_zero_is_quantised_as_zero():
    weight, inputs = correlated_layer(seed=5, rows=8, columns=64)
    inputs[:, 7] = 0  # H_77 = 0: nothing the layer sees depends on column 7
    values = decoded(gptq.gptq_quantize(weight, inputs, Q4_0), Q4_0, weight.shape)
    np.testing.assert_array_equal(values[:, 7], 0)
    assert np.isfinite(values).all()


def test_a_singular_hessian_without_damping_is_one_clear_error():
    weight, inputs = correlated_layer(seed=6, rows=4, columns=64, samples=8)  # rank 8 of 64
    with pytest.raises(InputError, match="not positive definite even with damp=0"):
        gptq.gptq_quantize(weight, inputs, Q4_0, damp=0)
    assert gptq.gptq_quantize(weight, inputs, Q4_0).shape == (8, Q4_0.block_bytes)  # 1 % damping suffices
