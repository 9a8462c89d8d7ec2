"""Write the pretraining_tp = 2 fixture with Transformers 4.45.2.

Transformers 5.x ignores `pretraining_tp`; 4.45.2 still honours it (LlamaAttention, LlamaMLP and
LlamaForCausalLM compute every projection as `pretraining_tp` weight slices whose products are
concatenated or summed). Same maths, different float32 summation order. Run with the 4.45
environment (requirements-4.45.txt), from the repository root:

    python tests/reference/make_fixtures_tp.py

It writes tests/data/fixtures/pretraining_tp2/ and adds its entry to manifest.json, keeping the
entries of make_fixtures.py. The checkpoint is saved by 4.45, so config.json is in the 4.x
spelling Transformers itself wrote (rope_theta, rope_scaling null, torch_dtype).
"""

import os
import sys

import numpy as np
import torch
import torch.nn.functional
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixture_io  # noqa: E402
from make_fixtures import lm_labels, random_ids, store_case, tensor  # noqa: E402

SCRIPT = "tests/reference/make_fixtures_tp.py"
CASE = "pretraining_tp2"

if not transformers.__version__.startswith("4.45."):
    raise SystemExit(f"needs transformers 4.45.x (has the pretraining_tp path), found {transformers.__version__}")


class CountLinearCalls:
    """Count torch.nn.functional.linear calls (nn.Linear and the tp slices both go through it)."""

    def __enter__(self):
        self.count = 0
        self.original = torch.nn.functional.linear

        def counting_linear(*args, **kwargs):
            self.count += 1
            return self.original(*args, **kwargs)

        torch.nn.functional.linear = counting_linear
        return self

    def __exit__(self, *exc):
        torch.nn.functional.linear = self.original


@torch.no_grad()
def run(model, input_ids, labels):
    return model(
        input_ids=tensor(input_ids), labels=tensor(labels), output_hidden_states=True, output_attentions=True,
        use_cache=False,
    )


def main():
    torch.set_num_threads(1)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, pretraining_tp=2,
        attn_implementation="eager",
    )
    fixture_io.seed_everything(11)
    model = LlamaForCausalLM(config)
    fixture_io.randomize_weights(model, 11)
    directory = fixture_io.fresh_case_directory(CASE)
    model.save_pretrained(directory, safe_serialization=True)
    fixture_io.remove_generation_config(directory)

    model = LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    fixture_io.check_loaded_weights_equal_stored(model, directory)
    if model.config.pretraining_tp != 2 or model.config._attn_implementation != "eager":
        raise RuntimeError("the reloaded model is not on the eager pretraining_tp path")

    rng = np.random.default_rng(11)
    ids = random_ids(rng, 2, 12, config.vocab_size)
    mask = np.ones_like(ids)
    labels = lm_labels(rng, ids, mask)

    # Prove the tp path ran: with tp = 2 every projection (7 per layer + lm_head) is two calls.
    with CountLinearCalls() as tp_calls:
        out = run(model, ids, labels)
    model.config.pretraining_tp = 1
    with CountLinearCalls() as plain_calls:
        plain = run(model, ids, labels)
    model.config.pretraining_tp = 2
    expected_plain = 7 * config.num_hidden_layers + 1
    if plain_calls.count != expected_plain or tp_calls.count != 2 * expected_plain:
        raise RuntimeError(f"linear calls: tp=2 {tp_calls.count}, tp=1 {plain_calls.count}; tp path not taken")
    gap = (out.logits - plain.logits).abs().max().item()

    arrays = {
        "forward.input_ids": ids,
        "forward.attention_mask": mask,
        "forward.labels": labels,
        "forward.logits": out.logits,
        "forward.loss": out.loss,
        "forward.hidden_states": torch.stack(out.hidden_states),
        "forward.attentions": torch.stack(out.attentions),
    }
    notes = {
        "forward": f"tp path checked: {tp_calls.count} linear calls with pretraining_tp 2, {plain_calls.count} "
        f"with 1; tp=2 and tp=1 logits differ by at most {gap:.2e} (summation order)"
    }
    description = (
        f"pretraining_tp 2 computed by Transformers {transformers.__version__} (every projection and "
        "lm_head as 2 weight slices, concatenated or summed; biases are off, as that path ignores "
        "them), 4 query heads, 2 kv heads, float32, config.json as 4.45 saves it (4.x spelling). "
        "Calls: a batch with -100 labels, hidden states and attention weights."
    )
    entry = store_case(CASE, directory, "LlamaForCausalLM", arrays, description, notes, {})
    fixture_io.update_manifest(SCRIPT, fixture_io.library_versions(), {CASE: entry})
    print(f"{CASE}: {len(arrays)} arrays; {notes['forward']}")


if __name__ == "__main__":
    main()
