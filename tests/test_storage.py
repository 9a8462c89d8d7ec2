"""The storage layer: exact widening, streamed products equal to kept ones, reused buffers, progress.

Streamed weights (llama_np/weights/streaming.py) must give the numbers kept-widened ones give: widening
float16/bfloat16 is exact, and a product tiled over W's rows computes the same dot products, so
the only freedom is BLAS's summation order (REPEATED_TOLERANCE in tests/tolerance.py).
"""

import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from llama_np import LlamaForCausalLM, layers
from llama_np.cli import progress
from llama_np.generation import progress_held_back
from llama_np.weights import codecs, streaming, workers
from llama_np.formats.safetensors import Checkpoint, save_safetensors
from llama_np.weights.codecs import float32_to_bf16_bits
from llama_np.errors import CheckpointError
from llama_np.text.streaming import TextStreamer  # noqa: F401  (the streamer generate is used with)
from tolerance import REPEATED_TOLERANCE, assert_close, assert_same_token_ids

FIXTURES = Path(__file__).resolve().parent / "data" / "fixtures"
F16_FIXTURE = FIXTURES / "mqa_tied_f16"
BF16_FIXTURE = FIXTURES / "mha_bf16_sharded_4x"
EVERY_BIT_PATTERN = np.arange(2**16, dtype=np.uint32).astype(np.uint16)


def random_weight(rng, shape, storage_dtype):
    """A random (out, in) weight as stored: float16, or bfloat16 bits (uint16)."""
    values = (rng.standard_normal(shape) * 0.5).astype(np.float32)
    if storage_dtype == "F16":
        return values.astype(np.float16)
    return float32_to_bf16_bits(values)


def kept(stored, storage_dtype):
    """The reference widening: NumPy's own float16 cast, bfloat16 bits shifted into a float32."""
    if storage_dtype == "F16":
        return stored.astype(np.float32)
    return (stored.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("storage_dtype", ["F16", "BF16"])
def test_widening_is_exact_for_every_bit_pattern(storage_dtype):
    stored = EVERY_BIT_PATTERN.view(np.float16) if storage_dtype == "F16" else EVERY_BIT_PATTERN
    widened = codecs.widen(stored, storage_dtype)
    expected = kept(stored, storage_dtype)
    # bit for bit, so NaN payloads, signed zeros, subnormals and infinities all count
    np.testing.assert_array_equal(widened.view(np.uint32), expected.view(np.uint32))


def test_f16_widening_of_a_tile_with_inf_or_nan_falls_back_to_numpys_cast():
    tile = np.array([[1.0, -2.0, np.inf], [np.nan, -np.inf, 6e-8]], dtype=np.float16)
    out = np.empty(tile.shape, dtype=np.float32)
    assert codecs.widen_into(tile, "F16", out) is True
    np.testing.assert_array_equal(out, tile.astype(np.float32))
    assert codecs.widen_into(tile[:1, :2], "F16", out[:1, :2]) is False


@pytest.mark.parametrize("storage_dtype", ["F16", "BF16"])
@pytest.mark.parametrize("x_rows", [1, 2, 17])
def test_streamed_product_equals_the_kept_product(monkeypatch, storage_dtype, x_rows):
    # small tiles, so that 300 rows make many of them and a ragged last one on each worker
    monkeypatch.setattr(workers, "TILE_ELEMENTS", 16 * 96)
    rng = np.random.default_rng(x_rows)
    stored = random_weight(rng, (300, 96), storage_dtype)
    matrix = streaming.StreamedMatrix(stored, storage_dtype, "w")
    x = rng.standard_normal((1, x_rows, 96)).astype(np.float32)
    ours = x @ matrix.T
    assert ours.shape == (1, x_rows, 300) and ours.dtype == np.float32
    assert_close(ours, x @ kept(stored, storage_dtype).T, f"{storage_dtype} x ({x_rows} rows) @ W.T",
                 tolerance=REPEATED_TOLERANCE)


@pytest.mark.parametrize("storage_dtype", ["F16", "BF16"])
@pytest.mark.parametrize("bad_value", [np.inf, -np.inf, np.nan])
def test_a_streamed_matrix_holding_inf_or_nan_is_refused_naming_it(monkeypatch, storage_dtype, bad_value):
    monkeypatch.setattr(workers, "TILE_ELEMENTS", 8 * 8)  # 5 tiles of 8 rows: the bad one is the 4th
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((40, 8)) * 0.5).astype(np.float32)
    values[30, 2] = values[33, 0] = bad_value
    stored = values.astype(np.float16) if storage_dtype == "F16" else float32_to_bf16_bits(values)
    matrix = streaming.StreamedMatrix(stored, storage_dtype, "w", source="tensor 'w' in model.safetensors")
    x = np.ones((1, 8), dtype=np.float32)
    kind = "2 NaN and 0 infinite" if np.isnan(bad_value) else "0 NaN and 2 infinite"
    expected = f"tensor 'w' in model.safetensors holds {kind} values as float32 \\(the first at index \\(30, 2\\)\\)"
    for use in (lambda: x @ matrix.T, lambda: x @ matrix.T, lambda: matrix[[31, 33]], lambda: np.asarray(matrix)):
        with pytest.raises(CheckpointError, match=expected):
            use()
    np.testing.assert_array_equal(matrix[[0, 39]], kept(stored, storage_dtype)[[0, 39]])  # finite rows: looked up


@pytest.mark.parametrize("storage_dtype", ["F16", "BF16"])
def test_widening_with_a_name_checks_every_tile_and_accepts_large_finite_values(monkeypatch, storage_dtype):
    monkeypatch.setattr(workers, "TILE_ELEMENTS", 64)  # 8 tiles of 2 rows, on both workers
    values = np.full((16, 32), 0.5, dtype=np.float32)
    values[:4] = 60000.0 if storage_dtype == "F16" else 3e38  # bfloat16: those 2 tiles' sums overflow
    stored = values.astype(np.float16) if storage_dtype == "F16" else float32_to_bf16_bits(values)
    what = "tensor 'w' in model.safetensors"
    np.testing.assert_array_equal(codecs.widen(stored, storage_dtype, what=what), kept(stored, storage_dtype))
    values[13, 5] = np.nan
    stored = values.astype(np.float16) if storage_dtype == "F16" else float32_to_bf16_bits(values)
    with pytest.raises(CheckpointError, match=r"tensor 'w' in model.safetensors holds 1 NaN and 0 infinite "
                                              r"values as float32 \(the first at index \(13, 5\)\)"):
        codecs.widen(stored, storage_dtype, what=what)
    assert np.isnan(codecs.widen(stored, storage_dtype)).any(), "without a name: widened as it is"


def test_a_kept_model_widens_every_tensor_before_its_first_product(monkeypatch):
    model = LlamaForCausalLM.from_pretrained(F16_FIXTURE)
    assert model.weights.keep_widened and not model.weights._widened
    widened_at_products = []

    def linear(x, w, *rest):
        widened_at_products.append(len(model.weights._widened))
        return original(x, w, *rest)

    original = layers.linear
    monkeypatch.setattr(layers, "linear", linear)
    model(np.array([[1, 2, 3]]))
    assert widened_at_products[0] == len(model.weights.tensors), "all widened before the first product"


def test_a_streamed_matrix_with_no_rows_or_no_columns_gives_an_empty_product():
    matrix = streaming.StreamedMatrix(np.zeros((0, 8), dtype=np.float16), "F16", "w")
    y = np.ones((1, 3, 8), dtype=np.float32) @ matrix.T
    assert y.shape == (1, 3, 0) and y.dtype == np.float32
    matrix = streaming.StreamedMatrix(np.zeros((5, 0), dtype=np.float16), "F16", "w")
    np.testing.assert_array_equal(np.ones((3, 0), dtype=np.float32) @ matrix.T, np.zeros((3, 5)))


def test_widening_to_float64_names_float64_in_the_error():
    stored = np.array([[1.0, np.inf]], dtype=np.float16)
    with pytest.raises(CheckpointError, match="0 NaN and 1 infinite values as float64"):
        codecs.widen(stored, "F16", np.float64, what="tensor 'w'")


def test_a_bfloat16_matrix_whose_tile_sum_overflows_is_still_accepted():
    values = np.full((4, 8), np.float32(3e38))  # finite, but the sum of a tile is inf
    stored = float32_to_bf16_bits(values)
    with np.errstate(over="ignore"):
        y = np.ones((1, 8), dtype=np.float32) @ streaming.StreamedMatrix(stored, "BF16", "w").T
    assert np.isposinf(y).all()  # the product overflows, as float32's own would; the weights are fine


@pytest.mark.parametrize("tensor", ["model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"])
def test_a_streamed_checkpoint_tensor_holding_nan_is_refused_naming_it_and_its_file(tmp_path, tensor):
    # as a kept tensor is (tests/test_checkpoint.py): one CheckpointError, not NaN logits
    directory = tmp_path / "nan"
    shutil.copytree(F16_FIXTURE, directory)
    checkpoint = Checkpoint.open(directory)
    tensors = {name: np.array(checkpoint[name].stored()) for name in checkpoint}
    tensors[tensor][1, 3] = np.nan
    save_safetensors(directory / "model.safetensors", tensors)
    streamed = LlamaForCausalLM.from_pretrained(directory, keep_widened=False)
    assert isinstance(streamed.weights[tensor], streaming.StreamedMatrix)
    with pytest.raises(CheckpointError, match=f"tensor '{tensor}' in .*model.safetensors holds 1 NaN and 0 "
                                              r"infinite values as float32 \(the first at index \(1, 3\)\)"):
        streamed(np.array([[1, 2, 3]]))


def test_streamed_products_reuse_the_same_tile_buffers():
    rng = np.random.default_rng(1)
    first = streaming.StreamedMatrix(random_weight(rng, (2048, 64), "F16"), "F16", "w1")
    second = streaming.StreamedMatrix(random_weight(rng, (1000, 64), "BF16"), "BF16", "w2")
    x = rng.standard_normal((1, 64)).astype(np.float32)
    x @ first.T, x @ second.T
    made = streaming.tile_buffers_made
    for _ in range(3):
        x @ first.T, x @ second.T
    assert streaming.tile_buffers_made == made, "every later product must reuse the buffers"
    assert sum(dtype == np.float32 for _, dtype in streaming._tile_buffers) <= workers.cpu_count()


def test_without_threadpoolctl_the_product_runs_on_one_thread(monkeypatch):
    monkeypatch.setattr(workers, "blas_controller", lambda: None)
    assert workers.product_workers() == 1
    rng = np.random.default_rng(2)
    stored = random_weight(rng, (100, 32), "BF16")
    x = rng.standard_normal((2, 32)).astype(np.float32)
    assert_close(x @ streaming.StreamedMatrix(stored, "BF16").T, x @ kept(stored, "BF16").T,
                 "one-thread product", tolerance=REPEATED_TOLERANCE)


def test_indexing_a_streamed_matrix_widens_only_the_rows_asked_for():
    rng = np.random.default_rng(3)
    stored = random_weight(rng, (50, 6), "F16")
    matrix = streaming.StreamedMatrix(stored, "F16", "embed")
    ids = np.array([[3, 7, 3]])
    np.testing.assert_array_equal(matrix[ids], stored.astype(np.float32)[ids])
    np.testing.assert_array_equal(np.asarray(matrix), stored.astype(np.float32))
    np.testing.assert_array_equal(matrix.reshape(5, 10, 6), stored.astype(np.float32).reshape(5, 10, 6))


@pytest.mark.parametrize("fixture", [F16_FIXTURE, BF16_FIXTURE], ids=["F16", "BF16"])
def test_a_streamed_model_gives_the_kept_models_logits_and_tokens(fixture):
    kept_model = LlamaForCausalLM.from_pretrained(fixture)
    streamed = LlamaForCausalLM.from_pretrained(fixture, keep_widened=False)
    assert kept_model.weights.keep_widened and not streamed.weights.keep_widened
    q_proj = streamed.weights["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(q_proj, streaming.StreamedMatrix)
    assert isinstance(streamed.weights["model.layers.0.input_layernorm.weight"], np.ndarray)
    ids = np.random.default_rng(4).integers(1, kept_model.config.vocab_size, size=(2, 7))
    assert_close(streamed(ids).logits, kept_model(ids).logits, f"{fixture.name} streamed logits",
                 tolerance=REPEATED_TOLERANCE)
    assert_same_token_ids(streamed.generate(ids, max_new_tokens=6, do_sample=False),
                          kept_model.generate(ids, max_new_tokens=6, do_sample=False),
                          f"{fixture.name} greedy tokens, streamed vs kept")


def test_a_widened_budget_keeps_the_first_tensors_used_and_streams_the_rest():
    name = "model.layers.0.self_attn.q_proj.weight"
    probe = LlamaForCausalLM.from_pretrained(F16_FIXTURE, keep_widened=False)
    one_tensor = int(np.prod(probe.weights.shape(name))) * 4
    model = LlamaForCausalLM.from_pretrained(F16_FIXTURE, keep_widened=False, widened_budget=one_tensor)
    assert isinstance(model.weights[name], np.ndarray)
    assert model.weights.widened_bytes == one_tensor
    assert isinstance(model.weights["model.layers.0.self_attn.k_proj.weight"], streaming.StreamedMatrix)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_shows_only_for_long_passes_on_a_terminal_and_is_erased(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the counter, not a tqdm bar
    bar = progress.LayerProgress()
    for i in range(3):
        bar(i, 3)
    assert terminal.getvalue() == "", "a pass shorter than the delay prints nothing"
    monkeypatch.setattr(progress, "PROGRESS_DELAY_SECONDS", 0.0)
    for i in range(3):
        bar(i, 3)
    assert "layer 1/3" in terminal.getvalue() and terminal.getvalue().endswith("\r\033[K")
    terminal.seek(0), terminal.truncate()
    model = LlamaForCausalLM.from_pretrained(F16_FIXTURE, keep_widened=False, progress=bar)
    with progress_held_back(model):
        model(np.array([[1, 2, 3]]))
    assert terminal.getvalue() == ""
    model(np.array([[1, 2, 3]]))
    assert "layer 1/" in terminal.getvalue(), "the bar is back after the block"


def test_generate_with_a_streamer_never_prints_progress(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(progress, "PROGRESS_DELAY_SECONDS", 0.0)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    model = LlamaForCausalLM.from_pretrained(F16_FIXTURE, keep_widened=False, progress=progress.LayerProgress())
    model.generate(np.array([[1, 2, 3]]), max_new_tokens=3, do_sample=False, streamer=lambda tokens: None)
    assert terminal.getvalue() == ""
    model.generate(np.array([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert terminal.getvalue().count("layer 1/") == 1, "without a streamer only the prompt's pass shows"


@pytest.mark.parametrize("x_rows", [1, 5])
def test_f16_tiles_scaled_through_x_give_the_same_product_bit_for_bit(monkeypatch, x_rows):
    monkeypatch.setattr(workers, "TILE_ELEMENTS", 16 * 40)
    rng = np.random.default_rng(5)
    stored = random_weight(rng, (257, 40), "F16")
    stored[0, :4] = [6e-8, -6e-8, 3e-5, 0.0]  # float16 subnormals and a zero
    x = rng.standard_normal((x_rows, 40)).astype(np.float32)
    scaled = x @ streaming.StreamedMatrix(stored, "F16").T
    monkeypatch.setattr(streaming, "F16_SCALED_INPUT_LIMIT", 0.0)  # every x too large: scale the tiles
    unscaled = x @ streaming.StreamedMatrix(stored, "F16").T
    np.testing.assert_array_equal(scaled.view(np.uint32), unscaled.view(np.uint32))


def test_f16_product_with_an_input_too_large_to_scale_is_still_exact():
    rng = np.random.default_rng(6)
    stored = random_weight(rng, (64, 16), "F16")
    x = rng.standard_normal((2, 16)).astype(np.float32)
    x[0, 3] = 60000.0  # x · 2**112 would overflow float32
    assert_close(x @ streaming.StreamedMatrix(stored, "F16").T, x @ stored.astype(np.float32).T,
                 "x with a large entry", tolerance=REPEATED_TOLERANCE)


def test_a_small_models_products_run_on_one_blas_thread_and_a_large_ones_do_not(monkeypatch):
    from threadpoolctl import threadpool_info

    seen = []
    real = LlamaForCausalLM.from_pretrained("tiny-shakespeare")
    original = real.weights.product_threads

    def spy():
        context = original()

        class Recording:
            def __enter__(self):
                context.__enter__()
                seen.append([lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"])

            def __exit__(self, *exc):
                return context.__exit__(*exc)
        return Recording()

    monkeypatch.setattr(real.weights, "product_threads", spy)
    real(np.array([[1, 2, 3]]))
    assert seen and all(threads == 1 for threads in seen[0]), seen
    assert workers.blas_threads_for(workers.SMALL_PRODUCT_ELEMENTS).__class__.__name__ == "nullcontext"


def test_progress_is_told_once_per_layer_of_a_forward_in_order_even_when_hooks_or_a_backward_ask_for_weights():
    import llama_np

    calls = []
    model = LlamaForCausalLM.from_pretrained("tiny-shakespeare", progress=lambda index, count: calls.append(index))
    ids = np.array([[1, 2, 3, 4]])
    layers_count = model.config.num_hidden_layers
    model(ids)
    calls.clear()
    model.set_use_attn_result(True)
    model.run_with_cache(ids)
    assert calls == list(range(layers_count))
    llama_np.value_and_grad(model, ids, labels=ids)  # the first makes the weights writable: one more widening pass
    calls.clear()
    llama_np.value_and_grad(model, ids, labels=ids)
    assert calls == list(range(layers_count)), "the backward's reads of the weights are not forward steps"
