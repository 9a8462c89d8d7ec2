"""Real activations for the checkers' cases: one traced forward pass of the bundled model.

The bundled model ("tiny-shakespeare") reads two lines of Shakespeare in a left-padded batch;
its activations become the inputs of the cases — the layer-0 input of rms_norm, the queries and
keys that RoPE rotates, the attention inputs with their padding mask, the next-token logits of
top-p. Without the bundled model (a source checkout before it is trained) a seeded random model
with deliberately odd sizes stands in, so the checkers work either way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from llama_np.formats.locate import bundled_model_names
from llama_np.config import LlamaConfig
from llama_np.errors import LlamaNPError
from llama_np.model import LlamaForCausalLM

BUNDLED_MODEL = "tiny-shakespeare"
SAMPLE_TEXTS = (
    "ROMEO:\nBut soft, what light through yonder window breaks?",
    "JULIET:\nO Romeo, Romeo!",
)

# The stand-in: 3 query heads per key/value head, head_dim·H ≠ D, nothing a power of two.
FALLBACK_CONFIG = dict(vocab_size=101, hidden_size=30, intermediate_size=46, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=2, head_dim=10, pad_token_id=0,
                       rms_norm_eps=1e-5, max_position_embeddings=128)


@dataclass
class ModelSample:
    """A model, a left-padded batch and every activation of one forward pass over it."""

    source: str  # how the cases name where they come from
    model: LlamaForCausalLM
    input_ids: np.ndarray  # (B, T), left-padded with pad_token_id
    attention_mask: np.ndarray  # (B, T) 1 for tokens, 0 for padding
    pad_token_id: int
    logits: np.ndarray  # (B, T, V)
    cache: object  # llama_np.interp.activation_cache.ActivationCache

    @property
    def config(self) -> LlamaConfig:
        return self.model.config

    def layer(self, index: int):
        """The widened weights of decoder layer ``index`` (negative counts from the end)."""
        return self.model.layer_weights(index % self.config.num_hidden_layers)

    def activation(self, point: str, layer: int = 0) -> np.ndarray:
        """cache["blocks.{layer}.{point}"], with negative layers counted from the end."""
        return self.cache[f"blocks.{layer % self.config.num_hidden_layers}.{point}"]


def left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists -> input_ids and attention_mask (B, T), padded on the left."""
    length = max(len(row) for row in rows)
    input_ids = np.full((len(rows), length), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row):] = row
        attention_mask[i, length - len(row):] = 1
    return input_ids, attention_mask


def _bundled_sample() -> ModelSample | None:
    if BUNDLED_MODEL not in bundled_model_names():
        return None
    try:
        from llama_np.text.tokenizer import LlamaTokenizer  # here, so a missing sentencepiece means the stand-in

        model = LlamaForCausalLM.from_pretrained(BUNDLED_MODEL)
        tokenizer = LlamaTokenizer.from_pretrained(BUNDLED_MODEL)
    except (LlamaNPError, OSError, ImportError):
        return None  # a bundled directory still being written: use the stand-in
    config = model.config
    # Llama 2 has no pad token; padding with eos is the usual choice, and the mask hides it.
    pad = config.pad_token_id if config.pad_token_id is not None else int(np.atleast_1d(config.eos_token_id)[0])
    input_ids, attention_mask = left_pad([tokenizer.encode(text) for text in SAMPLE_TEXTS], pad)
    return _traced(f"the bundled model {BUNDLED_MODEL}", model, input_ids, attention_mask, pad)


def _fallback_sample() -> ModelSample:
    config = LlamaConfig(**FALLBACK_CONFIG)
    model = LlamaForCausalLM.from_config(config, seed=0)
    rng = np.random.default_rng(0)
    # Fresh norms are all ones, which would hide a forgotten weight: make them uneven.
    for name in list(model.weights.tensors):
        if name.endswith("norm.weight"):
            model.weights[name] = rng.normal(1.0, 0.3, size=model.weights.shape(name)).astype(np.float32)
    rows = [list(rng.integers(3, config.vocab_size, size=n)) for n in (6, 9)]
    input_ids, attention_mask = left_pad(rows, config.pad_token_id)
    return _traced("a random stand-in model", model, input_ids, attention_mask, config.pad_token_id)


def _traced(source, model, input_ids, attention_mask, pad_token_id) -> ModelSample:
    logits, cache = model.run_with_cache(input_ids, attention_mask=attention_mask)
    return ModelSample(source, model, input_ids, attention_mask, pad_token_id, logits, cache)


@functools.lru_cache(maxsize=None)
def model_sample(prefer_bundled: bool = True) -> ModelSample:
    """The bundled model's sample when it is installed, else the random stand-in's (cached)."""
    sample = _bundled_sample() if prefer_bundled else None
    return sample if sample is not None else _fallback_sample()
