"""What llama_np's two Llama tokenizers share: the slow ``LlamaTokenizer`` (sentencepiece) and
``LlamaTokenizerFast`` (the ``tokenizers`` library) read the same side files, check their
arguments the same way and format chats the same way.

- **Side files.** ``read_pretrained_settings`` reads ``tokenizer_config.json`` and
  ``special_tokens_map.json`` as Transformers does (the map wins for special tokens).
- **Arguments.** Text, ids and settings are checked at the boundary, and ``padding`` /
  ``truncation`` / ``max_length`` are normalised by Transformers' rules (one
  ``TokenizerBase._padding_truncation_strategies`` for both classes).
- **Special tokens.** ``build_inputs_with_special_tokens`` puts ``[bos] + ids + [eos]`` around
  each segment, as ``add_bos_token`` / ``add_eos_token`` say (docs/reference.md §5.4).
- **Chat.** A ``chat_template`` from ``tokenizer_config.json`` is rendered as Transformers
  renders it (``render_chat_template``); without one, Meta's Llama 2 format is written
  (``llama2_chat_text``, docs/reference.md §5.6).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llama_np.formats.files import atomic_write_text, is_file, read_json_object
from llama_np.text.chat import _chat_template_of, llama2_chat_text, render_chat_template
from llama_np.errors import TokenizerError
from llama_np.inputs import is_integer

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_NAME = "special_tokens_map.json"

# Transformers' "no limit" value for model_max_length (int(1e30), as written in Llama 2's
# tokenizer_config.json); a limit at least this large means "do not truncate or pad to it".
VERY_LARGE_INTEGER = int(1e30)

# The named special tokens, in the order Transformers lists them in all_special_tokens.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")

# Settings of tokenizer_config.json that both tokenizers take as keyword arguments.
CONFIG_SETTINGS = ("add_bos_token", "add_eos_token", "legacy", "add_prefix_space", "padding_side",
                   "truncation_side", "model_max_length", "clean_up_tokenization_spaces")


class TokenizerBase:
    """The methods of the Transformers tokenizer API that do not depend on the backend.

    A subclass provides ``_token_to_id``, ``__call__``, ``decode`` and the attributes
    ``bos_token`` … ``pad_token``, ``additional_special_tokens``, ``add_bos_token``,
    ``add_eos_token``, ``model_max_length`` and ``chat_template``.
    """

    model_input_names = ("input_ids", "attention_mask")

    # ----------------------------------------------------------------------------------------
    # special tokens

    @property
    def all_special_tokens(self) -> list[str]:
        """bos, eos, unk, pad (those set), then the additional special tokens, without repeats."""
        named = [getattr(self, name) for name in SPECIAL_TOKEN_NAMES]
        tokens = [token for token in named + self.additional_special_tokens if token is not None]
        return list(dict.fromkeys(tokens))

    @property
    def all_special_ids(self) -> list[int]:
        return [self._token_to_id(token) for token in self.all_special_tokens]

    bos_token_id = property(lambda self: self._special_id(self.bos_token))
    eos_token_id = property(lambda self: self._special_id(self.eos_token))
    unk_token_id = property(lambda self: self._special_id(self.unk_token))
    pad_token_id = property(lambda self: self._special_id(self.pad_token))

    def _special_id(self, token):
        return None if token is None else self._token_to_id(token)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None) -> list[int]:
        """[bos] + A + [eos], and for a pair + [bos] + B + [eos]; bos/eos as the flags say."""
        bos = self._flagged_special_id("add_bos_token", "bos_token")
        eos = self._flagged_special_id("add_eos_token", "eos_token")
        output = bos + list(token_ids_0) + eos
        if token_ids_1 is not None:
            output += bos + list(token_ids_1) + eos
        return output

    def _flagged_special_id(self, flag: str, name: str) -> list[int]:
        """[id of the token ``name``] if the setting ``flag`` is on, else [].

        On with no such token (``"bos_token": null`` in tokenizer_config.json) is an error:
        Transformers would put None among the ids.
        """
        if not getattr(self, flag):
            return []
        token = getattr(self, name)
        if token is None:
            raise TokenizerError(
                f"{flag} is true but {name} is null, so there is no token to add: set {flag} "
                f"to false or give a {name}"
            )
        return [self._token_to_id(token)]

    # ----------------------------------------------------------------------------------------
    # encoding: what __call__ shares

    def encode(
        self, text, text_pair=None, add_special_tokens=True, truncation=None, max_length=None
    ) -> list[int]:
        """The ids of one text (and an optional second segment), with bos/eos as configured."""
        _check_text(text)  # one text; a batch goes through __call__
        encoding = self(
            text,
            text_pair,
            add_special_tokens=add_special_tokens,
            truncation=truncation,
            max_length=max_length,
            return_attention_mask=False,
        )
        return encoding["input_ids"]

    def _batch_inputs(self, text, text_pair, return_tensors):
        """Check __call__'s inputs; return (is_batch, texts, pairs), pairs holding None for none."""
        is_batch = isinstance(text, (list, tuple))
        texts = list(text) if is_batch else [text]
        if not texts:
            raise TokenizerError("text is an empty list: there is nothing to encode")
        for item in texts:
            _check_text(item)
        if text_pair is None:
            pairs = [None] * len(texts)
        else:
            pairs = list(text_pair) if is_batch else [text_pair]
            if is_batch != isinstance(text_pair, (list, tuple)) or len(pairs) != len(texts):
                raise TokenizerError(
                    f"text_pair must match text: {len(texts)} text(s) but text_pair is "
                    f"{text_pair!r:.80}"
                )
            for item in pairs:
                _check_text(item)
        if return_tensors not in (None, "np"):
            raise TokenizerError(
                f"return_tensors={return_tensors!r}: llama_np returns lists (None) or NumPy "
                "arrays ('np')"
            )
        return is_batch, texts, pairs

    @staticmethod
    def _batch_output(rows: list[dict], is_batch: bool, return_tensors) -> dict:
        """Per-example dicts of lists -> one dict of lists (a batch), of one list, or of arrays."""
        encoding = {key: [row[key] for row in rows] for key in rows[0]}
        if return_tensors == "np":
            lengths = {len(ids) for ids in encoding["input_ids"]}
            if len(lengths) > 1:
                raise TokenizerError(
                    f"return_tensors='np' needs sequences of one length; got lengths "
                    f"{sorted(lengths)}: pass padding=True (after adding a pad token)"
                )
            return {key: np.array(value, dtype=np.int64) for key, value in encoding.items()}
        if not is_batch:
            encoding = {key: value[0] for key, value in encoding.items()}
        return encoding

    def _padding_truncation_strategies(self, padding, truncation, max_length):
        """Normalise the padding / truncation arguments the way Transformers does.

        Except for max_length: Transformers ignores 0 (and logs, then ignores, a negative
        value), leaving the text whole; here either is an error.
        """
        if max_length is not None and not (is_integer(max_length) and max_length > 0):
            raise TokenizerError(
                f"max_length must be a positive integer or None, got {max_length!r:.80}"
            )
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"
        padding = {
            False: None,
            "do_not_pad": None,
            True: "longest",
            "longest": "longest",
            "max_length": "max_length",
        }.get(padding, padding)
        truncation = {
            None: None,
            False: None,
            "do_not_truncate": None,
            True: "longest_first",
            "longest_first": "longest_first",
            "only_first": "only_first",
            "only_second": "only_second",
        }.get(truncation, truncation)
        if padding not in (None, "longest", "max_length"):
            raise TokenizerError(
                f"padding={padding!r}: expected False, True, 'longest' or 'max_length'"
            )
        if truncation not in (None, "longest_first", "only_first", "only_second"):
            raise TokenizerError(
                f"truncation={truncation!r}: expected False, True, 'longest_first', 'only_first' "
                "or 'only_second'"
            )
        if max_length is None and (padding == "max_length" or truncation is not None):
            if self.model_max_length >= VERY_LARGE_INTEGER:
                raise TokenizerError(
                    f"padding={padding!r} / truncation={truncation!r} need max_length: this "
                    "tokenizer has no model_max_length to fall back on"
                )
            max_length = self.model_max_length
        if padding is not None and self.pad_token is None:
            raise TokenizerError(
                "asked to pad, but this tokenizer has no pad token (Llama 2 has none): call "
                "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and grow the model's "
                "embedding with model.resize_token_embeddings(len(tokenizer))"
            )
        return padding, truncation, max_length

    # ----------------------------------------------------------------------------------------
    # decoding and chat

    def batch_decode(self, sequences, skip_special_tokens=False) -> list[str]:
        """decode() for every row of a batch (a list of lists or a 2-D array)."""
        if isinstance(sequences, np.ndarray) and sequences.ndim != 2:
            raise TokenizerError(
                f"batch_decode takes a (B, T) batch of ids, got an array of shape {sequences.shape}"
            )
        if not isinstance(sequences, (list, tuple, np.ndarray)):
            raise TokenizerError(f"batch_decode takes a (B, T) batch of ids (a list of lists or an array), "
                                 f"got {type(sequences).__name__} {sequences!r:.60}")
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in sequences]

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        """Write a conversation in the model's chat format; return ids (tokenize=True) or text.

        ``messages`` is ``[{"role": ..., "content": ...}, ...]``. When the tokenizer has a
        ``chat_template`` (from ``tokenizer_config.json``), it is rendered as Transformers
        renders it (``render_chat_template``: Jinja in a sandbox, with ``messages``,
        ``add_generation_prompt``, ``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``,
        ``raise_exception`` and ``strftime_now``). Without one, the dialog is written in Meta's
        Llama 2 format (``llama2_chat_text``, docs/reference.md §5.6). Either way the text is
        then encoded without adding bos/eos, since the format writes its own; with legacy=True
        the Llama 2 format gives exactly Meta's ids.

        Unlike Transformers, ``add_generation_prompt`` defaults to True: llama_np's callers
        format a conversation so that the model answers it.
        """
        if self.chat_template is not None:
            text = render_chat_template(self.chat_template, messages, add_generation_prompt,
                                        self.special_tokens_map)
        else:
            text = llama2_chat_text(messages, self.bos_token, self.eos_token,
                                    add_generation_prompt)
        if not tokenize:
            return text
        return self.encode(text, add_special_tokens=False)

    def _save_side_files(self, directory: Path, tokenizer_class: str, settings: dict):
        """Write tokenizer_config.json and special_tokens_map.json in Transformers' layout."""
        special = {name: getattr(self, name) for name in SPECIAL_TOKEN_NAMES
                   if getattr(self, name) is not None}
        if self.additional_special_tokens:
            special["additional_special_tokens"] = list(self.additional_special_tokens)
        config = {
            "tokenizer_class": tokenizer_class,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            **settings,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "model_max_length": self.model_max_length,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "pad_token": None,
            **special,
            "added_tokens_decoder": {
                str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
                for token, i in sorted(self.added_tokens_encoder.items(), key=lambda item: item[1])
            },
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        paths = (directory / TOKENIZER_CONFIG_NAME, directory / SPECIAL_TOKENS_MAP_NAME)
        atomic_write_text(paths[0], json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(paths[1], json.dumps(special, indent=2, ensure_ascii=False) + "\n")
        return tuple(map(str, paths))

    @property
    def special_tokens_map(self) -> dict:
        """{"bos_token": "<s>", ...} for the special tokens that are set, as Transformers has it."""
        tokens = {name: getattr(self, name) for name in SPECIAL_TOKEN_NAMES if getattr(self, name)}
        if self.additional_special_tokens:
            tokens["additional_special_tokens"] = list(self.additional_special_tokens)
        return tokens


def read_pretrained_settings(directory: Path) -> tuple[dict, dict[int, str]]:
    """The keyword arguments a tokenizer directory's side files give, and its added tokens.

    Reads ``tokenizer_config.json`` (the settings of ``CONFIG_SETTINGS``, the special tokens,
    ``chat_template``) and ``special_tokens_map.json``, which wins for special tokens as in
    Transformers. Returns ``(settings, {id: token})`` with the ``added_tokens_decoder`` entries.
    """
    config_path = directory / TOKENIZER_CONFIG_NAME
    config = _read_json(config_path)
    special_map = _read_json(directory / SPECIAL_TOKENS_MAP_NAME)
    settings = {key: config[key] for key in CONFIG_SETTINGS if config.get(key) is not None}
    _check_settings(settings, config_path)
    for name in SPECIAL_TOKEN_NAMES:
        value = special_map.get(name, config.get(name, "absent"))
        if value != "absent":
            settings[name] = _token_content(value, config_path, name)
    extra_path = directory / (
        SPECIAL_TOKENS_MAP_NAME if special_map.get("additional_special_tokens") else TOKENIZER_CONFIG_NAME
    )
    extra = special_map.get("additional_special_tokens") or config.get("additional_special_tokens")
    if extra:
        if not isinstance(extra, list):  # a string would become one special token per letter
            raise TokenizerError(
                f"{extra_path}: additional_special_tokens must be a list of tokens, got {extra!r:.80}"
            )
        settings["additional_special_tokens"] = [
            _token_content(t, extra_path, "additional_special_tokens") for t in extra
        ]
    if config.get("chat_template") is not None:
        settings["chat_template"] = _chat_template_of(config["chat_template"], config_path)

    added = config.get("added_tokens_decoder") or {}
    if not isinstance(added, dict):
        raise TokenizerError(
            f"{config_path}: added_tokens_decoder must map token ids to tokens, got {added!r:.80}"
        )
    added_tokens = {}
    for index, token in added.items():
        if not (index.isascii() and index.isdigit()):
            raise TokenizerError(
                f"{config_path}: added_tokens_decoder has the key {index!r}; expected a token id"
            )
        added_tokens[int(index)] = _token_content(token, config_path, "added_tokens_decoder")
    return settings, added_tokens


def check_added_tokens(tokenizer, added_tokens: dict[int, str], config_path) -> None:
    """Tokens saved with ids beyond the base vocabulary must come back at those ids."""
    for index, content in added_tokens.items():
        loaded = tokenizer.added_tokens_encoder.get(content)
        if loaded is None and index < tokenizer.vocab_size:
            continue  # a piece of the base vocabulary; nothing to restore
        if loaded != index:
            raise TokenizerError(
                f"{config_path}: added token {content!r} is saved with id {index} but loads as "
                f"{'no token' if loaded is None else f'id {loaded}'}; llama_np supports added "
                "special tokens only, numbered in order from the vocabulary size"
            )


# --------------------------------------------------------------------------------------------
# chat formats


# --------------------------------------------------------------------------------------------
# checks and side files


def _check_text(text):
    if not isinstance(text, str):
        raise TokenizerError(
            "text must be a string (or a list of strings for a batch), "
            f"got {type(text).__name__} {text!r:.80}"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:  # e.g. undecodable bytes of a command-line argument
        raise TokenizerError(
            f"text holds {text[error.start:error.end]!r}, which is not a character UTF-8 can "
            f"encode (a lone surrogate), at position {error.start}"
        ) from None
    return text


def clean_up_tokenization(text: str) -> str:
    """Transformers' clean_up_tokenization: no space before . ? ! , and English contractions."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                           (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                           (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text


def _check_settings(settings: dict, path=None) -> None:
    """TokenizerError naming the setting (and the file it was read from) that has a wrong type:
    a string such as "false" would otherwise switch a flag on."""
    where = f"{path}: " if path else ""
    for name in ("add_bos_token", "add_eos_token", "legacy", "add_prefix_space",
                 "clean_up_tokenization_spaces"):
        value = settings.get(name)
        if value is not None and not isinstance(value, bool):
            raise TokenizerError(f"{where}{name} must be true or false, got {value!r:.80}")
    limit = settings.get("model_max_length")
    if limit is not None and not (is_integer(limit) and limit > 0):
        raise TokenizerError(f"{where}model_max_length must be a positive integer, got {limit!r:.80}")


def _check_token_string(name, token):
    if not isinstance(token, str) or not token:
        raise TokenizerError(
            f"{name} must be a non-empty string, got {type(token).__name__} {token!r:.80}"
        )
    return token


def _check_side(name, side):
    if side not in ("right", "left"):
        raise TokenizerError(f"{name}={side!r}: expected 'right' or 'left'")
    return side


def _check_ids(ids, vocabulary_length) -> list[int]:
    """A 1-D sequence of ints in [0, vocabulary_length), as plain ints; else TokenizerError."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise TokenizerError(
                f"token ids must be a 1-D integer array, got shape {ids.shape} and dtype "
                f"{ids.dtype} "
                "(use batch_decode for a (B, T) batch)"
            )
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise TokenizerError(
            f"token ids must be a list of ints, got {type(ids).__name__} {ids!r:.80}"
        )
    checked = []
    for position, value in enumerate(ids):
        if not is_integer(value):
            raise TokenizerError(
                f"token id at position {position} is {type(value).__name__} {value!r:.40}, "
                "not an int"
            )
        if not 0 <= int(value) < vocabulary_length:
            raise TokenizerError(
                f"token id {int(value)} at position {position} is outside the vocabulary "
                f"(ids 0..{vocabulary_length - 1})"
            )
        checked.append(int(value))
    return checked


def _read_json(path: Path) -> dict:
    """A tokenizer side file (tokenizer_config.json, ...) as a dict; {} when it is absent."""
    if not is_file(path, TokenizerError):
        return {}
    return read_json_object(path, TokenizerError)


def _token_content(value, path, field):
    """A token as saved by Transformers: a string, null, or an AddedToken dict with "content"."""
    content = value.get("content") if isinstance(value, dict) else value
    if content is None and not isinstance(value, dict):
        return None
    if isinstance(content, str) and content:
        return content
    raise TokenizerError(
        f"{path}: {field} is {value!r:.80}; expected a non-empty string or a dict with 'content'"
    )
