"""Store TransformerLens' activations for the bundled model in ``tests/data/transformerlens/``.

Run from the repository root, in a virtualenv with ``tests/reference/requirements-transformerlens.txt``::

    python tests/reference/make_transformerlens_reference.py

The shipped float16 ``llama_np/assets/tiny-shakespeare/`` is loaded in Transformers as float32
with eager attention, then turned into a ``HookedTransformer`` with TransformerLens' own Llama
weight converter (``convert_llama_weights``) and a ``HookedTransformerConfig`` built from our
config.json. No weight processing: fold_ln, center_writing_weights, center_unembed,
fold_value_biases and refactor_factored_attn_matrices are all off, so every hook sees the
checkpoint's own weights. The script refuses to store anything unless TransformerLens' logits
equal Transformers' within MAX_LOGIT_DIFF.

One prompt (sentencepiece from the shipped ``tokenizer.model``, bos prepended, batch of 1, no
padding) is run twice with ``run_with_cache``:

* ``default``: TransformerLens' default settings;
* ``extended``: after ``set_use_attn_result(True)``, ``set_use_split_qkv_input(True)`` and
  ``set_use_hook_mlp_in(True)``, which add ``attn.hook_result`` (per-head output),
  ``hook_q_input`` / ``hook_k_input`` / ``hook_v_input`` and ``hook_mlp_in``.
  ``set_use_attn_in(True)`` is refused by TransformerLens for grouped-query attention; the
  manifest records its message.

Writes ``tiny-shakespeare.npz``: ``input_ids`` (1, T) int64, ``logits`` (1, T, V) and
``default/<hook name>`` for every hook of the default run (float32, batch dimension kept), and
``extended/<hook name>`` for the hooks the options add or reshape (ln1 then normalizes the q, k
and v inputs separately, and the cache keeps its last call, on v). The extended run's other hooks
hold the default run's quantities summed in another order; they are not stored again, and the
manifest gives how far each drifts. ``manifest.json`` also records the versions, the date, the
sha256 of the checkpoint files, the HookedTransformerConfig, the prompt and its ids, every hook
with its shape in each run, and the largest |TransformerLens logits − Transformers logits|.
"""

import argparse
import datetime
import hashlib
import json
import platform
from importlib.metadata import version
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import transformer_lens
import transformers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import convert_llama_weights

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "llama_np" / "assets" / "tiny-shakespeare"
OUT = REPO / "tests" / "data" / "transformerlens"
NAME = "tiny-shakespeare"
PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks?"
# TransformerLens computes RMSNorm as x / sqrt(mean(x²) + eps) and RoPE angles as pos / base^(…);
# Transformers multiplies by rsqrt and by inverse frequencies, so the two differ in the last bits.
MAX_LOGIT_DIFF = 1e-4

EXTENDED_OPTIONS = ["set_use_attn_result(True)", "set_use_split_qkv_input(True)", "set_use_hook_mlp_in(True)"]
# The hook points that only exist with one of those options.
ENABLED_BY = {"hook_result": "set_use_attn_result", "hook_q_input": "set_use_split_qkv_input",
              "hook_k_input": "set_use_split_qkv_input", "hook_v_input": "set_use_split_qkv_input",
              "hook_mlp_in": "set_use_hook_mlp_in"}


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_config(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        raise SystemExit(f"{model_dir}/config.json: only the default RoPE is mapped to TransformerLens here, "
                         f"got {rope or config.get('rope_scaling')}")
    if config.get("attention_bias") or config.get("mlp_bias") or config.get("pretraining_tp", 1) != 1:
        raise SystemExit(f"{model_dir}/config.json: biases and pretraining_tp > 1 are not mapped here")
    return config


def hooked_config(config):
    """A HookedTransformerConfig for our config.json, as TransformerLens maps Llama checkpoints."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", config["num_attention_heads"])
    return HookedTransformerConfig(
        d_model=config["hidden_size"],
        d_head=head_dim,
        n_heads=config["num_attention_heads"],
        # None means plain multi-head attention to TransformerLens; any number selects its
        # GroupedQueryAttention, even when it equals n_heads.
        n_key_value_heads=kv_heads if kv_heads != config["num_attention_heads"] else None,
        d_mlp=config["intermediate_size"],
        n_layers=config["num_hidden_layers"],
        n_ctx=config["max_position_embeddings"],
        d_vocab=config["vocab_size"],
        eps=config["rms_norm_eps"],
        act_fn=config["hidden_act"],
        normalization_type="RMS",
        final_rms=True,
        positional_embedding_type="rotary",
        rotary_dim=head_dim,
        rotary_base=config["rope_parameters"]["rope_theta"],
        # Llama rotates dimension i with i + hd/2 (rotate_half), not adjacent pairs (GPT-J).
        rotary_adjacent_pairs=False,
        gated_mlp=True,
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        original_architecture="LlamaForCausalLM",
        dtype=torch.float32,
        device="cpu",
        init_weights=False,
    )


def hooked_transformer(hf_model, cfg):
    model = HookedTransformer(cfg)
    state_dict = convert_llama_weights(hf_model, cfg)
    model.load_and_process_state_dict(
        state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False,
    )
    model.eval()
    return model


@torch.no_grad()
def cached_run(model, ids):
    logits, cache = model.run_with_cache(torch.tensor(ids))
    arrays = {"logits": logits.float().numpy()}
    for name, value in cache.items():
        arrays[name] = value.float().numpy()
    return arrays


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.manual_seed(0)  # nothing here is random; set anyway
    torch.set_num_threads(1)

    config = read_config(args.model)
    sp = spm.SentencePieceProcessor(model_file=str(args.model / "tokenizer.model"))
    ids = np.array([[sp.bos_id()] + sp.encode(PROMPT)], dtype=np.int64)
    assert 15 <= ids.shape[1] <= 40, ids.shape

    hf_model = transformers.LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                             attn_implementation="eager")
    hf_model.eval()
    with torch.no_grad():
        hf_logits = hf_model(torch.tensor(ids)).logits.numpy()

    cfg = hooked_config(config)
    config_record = {k: _plain(v) for k, v in sorted(cfg.to_dict().items())}  # before the options change it
    model = hooked_transformer(hf_model, cfg)
    groups = {"default": cached_run(model, ids)}
    logit_diff = float(np.abs(groups["default"]["logits"] - hf_logits).max())
    print(f"max |TransformerLens logits - Transformers logits| = {logit_diff:.3e}")
    if not logit_diff <= MAX_LOGIT_DIFF:
        raise SystemExit(f"TransformerLens' logits differ from Transformers' by {logit_diff:.3e} "
                         f"(allowed {MAX_LOGIT_DIFF}); the config mapping is wrong")

    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    try:
        model.set_use_attn_in(True)
        attn_in_refused = None
    except AssertionError as error:
        attn_in_refused = str(error)
        print(f"set_use_attn_in(True) refused: {attn_in_refused}")
    groups["extended"] = cached_run(model, ids)
    extended_diff = float(np.abs(groups["extended"]["logits"] - hf_logits).max())
    print(f"extended run: max |TransformerLens logits - Transformers logits| = {extended_diff:.3e}")
    if not extended_diff <= MAX_LOGIT_DIFF:
        raise SystemExit(f"the extended run's logits differ from Transformers' by {extended_diff:.3e}")

    default, extended = groups["default"], groups["extended"]
    if not np.array_equal(default["logits"], default["unembed.hook_out"]):
        raise SystemExit("unembed.hook_out is no longer the logits; check what TransformerLens hooks there")
    arrays = {"input_ids": ids, "logits": default.pop("logits")}
    extended.pop("logits")
    hooks = {}
    for name, value in default.items():
        arrays[f"default/{name}"] = value
        hooks[name] = {"shape": {"default": list(value.shape)}, "stored": [f"default/{name}"]}
    for name, value in extended.items():
        entry = hooks.setdefault(name, {"shape": {}, "stored": [], "enabled_by": ENABLED_BY.get(name.split(".")[-1])})
        entry["shape"]["extended"] = list(value.shape)
        if name in default and default[name].shape == value.shape:
            # The same quantity as in the default run, summed in another order (einsum over the
            # repeated head inputs, per-head results added up): kept once, its drift recorded.
            entry["extended_max_abs_diff_vs_default"] = _max_abs_diff(value, default[name])
        else:
            arrays[f"extended/{name}"] = value
            entry["stored"].append(f"extended/{name}")
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / f"{NAME}.npz", **arrays)

    manifest = {
        "generator": "tests/reference/make_transformerlens_reference.py",
        "date": datetime.date.today().isoformat(),
        "versions": {"transformer_lens": version("transformer_lens"), "torch": torch.__version__,
                     "transformers": transformers.__version__, "sentencepiece": spm.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "reference": ("TransformerLens HookedTransformer built with convert_llama_weights from Transformers' "
                      "LlamaForCausalLM (shipped float16 weights loaded as float32, eager attention); no "
                      "weight processing; CPU, one torch thread"),
        "checkpoint": {f: sha256(args.model / f) for f in ("model.safetensors", "config.json", "tokenizer.model")},
        "hooked_transformer_config": config_record,
        "prompt": PROMPT,
        "input_ids": ids[0].tolist(),
        "max_abs_logits_diff_vs_transformers": {"default": logit_diff, "extended": extended_diff},
        "groups": {
            "default": "run_with_cache with TransformerLens' default settings",
            "extended": "run_with_cache after " + ", ".join(EXTENDED_OPTIONS),
        },
        "set_use_attn_in_refused": attn_in_refused,
        "arrays": {
            "input_ids": f"{list(ids.shape)} int64: bos + sentencepiece ids of the prompt",
            "logits": "(1, T, V) float32 logits of the default run (bitwise equal to default/unembed.hook_out)",
            "default/<hook name>": "float32 activation cached at that hook in the default run, batch dimension kept",
            "extended/<hook name>": ("float32 activation cached in the extended run, stored only for the hooks the "
                                     "options add and those whose shape changes with them (ln1, which then runs "
                                     "on the q, k and v inputs separately and keeps the last call); every other "
                                     "hook is the default run's quantity, and hooks.<name>."
                                     "extended_max_abs_diff_vs_default says how far it drifts"),
        },
        # The order each run's cache holds its hooks in: the order the forward pass first reaches them.
        "cache_order": {group: list(values) for group, values in groups.items()},
        "hooks": hooks,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    sizes = {p.name: p.stat().st_size for p in sorted(args.out.iterdir())}
    print(f"wrote {args.out}: {sizes}; {len(default)} hooks in the default run, {len(hooks)} in all")


def _max_abs_diff(a, b):
    """max |a − b|, counting equal infinities (the masked attention scores) as no difference."""
    diff = np.zeros(a.shape)
    np.subtract(a, b, out=diff, where=a != b, dtype=np.float64)
    return float(np.abs(diff).max())


def _plain(value):
    """A config value as JSON can hold it (dtypes and devices as strings)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


if __name__ == "__main__":
    main()
