"""Every figure is a Figure with a title and labelled axes; token labels are readable."""

import numpy as np
import pytest
from matplotlib.figure import Figure

from llama_np import LlamaConfig, LlamaForCausalLM, layers
from llama_np.interp import plotting
from llama_np.errors import InputError
from llama_np.interp.plotting import display_token
from tolerance import REPEATED_TOLERANCE, assert_close, assert_relatively_close

CONFIG = dict(vocab_size=41, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
              num_attention_heads=6, num_key_value_heads=2, head_dim=4, pad_token_id=0)
INPUT_IDS = np.array([[0, 0, 5, 17, 3, 40, 8], [7, 11, 13, 19, 23, 29, 31]])
PADDING = (INPUT_IDS != 0).astype(np.int64)
PIECES = ["<pad>", "<s>", "</s>", "<0x0A>"] + [f"▁w{i}" if i % 2 else f"p{i}" for i in range(37)]
TOKENS = [PIECES[i] for i in INPUT_IDS[0]]


@pytest.fixture(scope="module")
def model():
    return LlamaForCausalLM.from_config(LlamaConfig(**CONFIG), seed=5)


@pytest.fixture(scope="module")
def cache(model):
    return model.run_with_cache(INPUT_IDS, attention_mask=PADDING)[1]


def assert_titled_and_labelled(fig):
    """A title on the figure or on every panel; x and y labels on every panel or the figure."""
    assert isinstance(fig, Figure)
    suptitle = fig._suptitle.get_text() if fig._suptitle else ""
    supx = fig._supxlabel.get_text() if fig._supxlabel else ""
    supy = fig._supylabel.get_text() if fig._supylabel else ""
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.axison and ax.get_label() != "<colorbar>"]
    assert panels
    for ax in panels:
        assert suptitle or ax.get_title(), "a panel has no title"
        assert supx or ax.get_xlabel(), f"panel {ax.get_title()!r} has no x label"
        assert supy or ax.get_ylabel(), f"panel {ax.get_title()!r} has no y label"
    fig.canvas.draw()  # renders without error (and without a display)
    fig.clear()


@pytest.mark.parametrize("piece, shown", [
    ("▁the", "␣the"), ("▁", "␣"), ("<0x0A>", "<0x0A>"), ("\n", "<0x0A>"), ("a\tb", "a<0x09>b"),
    ("<s>", "<s>"), ("hello world", "hello␣world"), ("", ""),
])
def test_display_token_shows_spaces_and_bytes(piece, shown):
    assert display_token(piece) == shown


def test_attention_head_labels_tokens_and_blanks_padding(cache):
    fig = plotting.plot_attention_head(cache, layer=1, head=4, tokens=TOKENS, attention_mask=PADDING)
    ax = fig.axes[0]
    assert ax.get_title() == "Attention pattern, layer 1, head 4"
    assert [t.get_text() for t in ax.get_xticklabels()] == [display_token(t) for t in TOKENS]
    shown = ax.images[0].get_array()
    assert np.ma.getmaskarray(shown)[:2].all() and np.ma.getmaskarray(shown)[:, :2].all()  # padding blank
    assert_titled_and_labelled(fig)


def test_attention_head_accepts_a_models_attentions_tuple(model):
    attentions = model(INPUT_IDS, output_attentions=True).attentions
    fig = plotting.plot_attention_head(attentions, layer=0, head=0, tokens=TOKENS, batch_index=1)
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), attentions[0][1, 0])
    assert_titled_and_labelled(fig)


def test_attention_layer_groups_query_heads_by_key_value_head(cache):
    fig = plotting.plot_attention_layer(cache, layer=2, num_key_value_heads=2, tokens=TOKENS)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["head 0 · kv 0", "head 1 · kv 0", "head 2 · kv 0",
                      "head 3 · kv 1", "head 4 · kv 1", "head 5 · kv 1"]
    assert "2 groups of 3" in fig._suptitle.get_text()
    assert_titled_and_labelled(fig)


def test_attention_layer_refuses_heads_that_do_not_divide(cache):
    with pytest.raises(InputError, match="multiple of KV"):
        plotting.plot_attention_layer(cache, layer=0, num_key_value_heads=4)


def test_rope_frequency_figure_compares_scaling_types():
    plain, _ = layers.default_rope_frequencies(64, 10000.0)
    linear, _ = layers.linear_rope_frequencies(64, 10000.0, 4.0)
    fig = plotting.plot_rope_frequencies({"default": plain, "linear ×4": linear}, max_position_embeddings=4096)
    assert_relatively_close(fig.axes[0].lines[0].get_ydata(), plain, "plotted frequencies")
    assert_titled_and_labelled(fig)


def test_rope_rotation_keeps_each_pair_on_its_circle():
    inv_freq, _ = layers.default_rope_frequencies(8, 10000.0)
    vector = np.arange(1, 9, dtype=np.float32)
    fig = plotting.plot_rope_rotation(vector, inv_freq, num_positions=12, pairs=[0, 3])
    first_pair = fig.axes[0].collections[0].get_offsets()  # dims 0 and 4 over 12 positions
    assert first_pair.shape == (12, 2)
    assert_relatively_close(np.hypot(*first_pair.T), np.full(len(first_pair), np.hypot(1, 5)), "rotation radius", REPEATED_TOLERANCE)
    assert_titled_and_labelled(fig)


def test_logit_lens_writes_the_top_token_of_each_cell(model, cache):
    fig = plotting.plot_logit_lens(model, cache, TOKENS, id_to_token=PIECES)
    ax = fig.axes[0]
    assert len(ax.texts) == CONFIG["num_hidden_layers"] * INPUT_IDS.shape[1]
    logits = model(INPUT_IDS, attention_mask=PADDING).logits
    last_row = [t.get_text() for t in ax.texts[-INPUT_IDS.shape[1]:]]
    assert last_row == [display_token(PIECES[i]) for i in logits[0].argmax(-1)]
    assert_titled_and_labelled(fig)


def test_activation_norms_leave_padding_out(cache):
    fig = plotting.plot_activation_norms(cache, attention_mask=PADDING)
    resid_post = np.linalg.norm(cache.stack("hook_resid_post").astype(np.float64), axis=-1)[:, PADDING.astype(bool)]
    assert_close(fig.axes[0].lines[-1].get_ydata(), resid_post.mean(axis=-1), "plotted means", REPEATED_TOLERANCE)
    assert_titled_and_labelled(fig)


def test_embedding_pad_row_figure_marks_the_pad_row(model):
    embed = model.weights["model.embed_tokens.weight"]
    fig = plotting.plot_embedding_pad_row(embed, pad_token_id=0)
    assert "pad row (id 0): 0" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert_titled_and_labelled(fig)
    with pytest.raises(InputError, match="no pad token"):
        plotting.plot_embedding_pad_row(embed, pad_token_id=None)
