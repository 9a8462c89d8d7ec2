"""The sentencepiece trainer settings of Llama 2's tokenizer.model, shared by every script here
that trains a tokenizer (the tokenizer test model and the bundled tiny-shakespeare model).

The values are read off the trainer_spec / normalizer_spec stored inside Meta's Llama 2
tokenizer.model; only the vocabulary size and the input differ.
"""

LLAMA2_TRAINER_SETTINGS = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    split_by_unicode_script=True,
    split_by_number=True,
    split_by_whitespace=True,
    max_sentencepiece_length=16,
    character_coverage=0.99995,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    unk_surface=" \u2047 ",
    vocabulary_output_piece_score=True,
    hard_vocab_limit=True,
    treat_whitespace_as_suffix=False,
)


def train_llama2_style_tokenizer(input_path, model_prefix, vocab_size, **overrides):
    """Train a sentencepiece BPE model with Llama 2's settings; writes {model_prefix}.model."""
    import sentencepiece as spm

    settings = dict(LLAMA2_TRAINER_SETTINGS, **overrides)
    spm.SentencePieceTrainer.train(
        input=str(input_path),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        num_threads=2,
        **settings,
    )
