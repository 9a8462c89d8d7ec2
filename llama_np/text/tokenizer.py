"""LlamaTokenizer: Llama 2's sentencepiece tokenizer, token for token equal to Transformers 4.45.2's
slow ``LlamaTokenizer``, plus chat formatting and an incremental decoder for streaming.

The pieces, and what docs/reference.md §5 says about each:

- **Encoding.** Special-token strings written in the text (``<s>``, ``</s>``, ``<unk>``, an added
  ``<pad>``) are split out first; every other chunk goes through the sentencepiece BPE model
  (``tokenizer.model``). How a chunk gets its leading "▁" is the ``legacy`` switch, explained in
  ``LlamaTokenizer._encode_chunk``.
- **Special tokens.** ``build_inputs_with_special_tokens`` puts ``[bos] + ids + [eos]`` around each
  segment, as ``add_bos_token`` / ``add_eos_token`` say.
- **Decoding.** "▁" becomes a space, ``<0xNN>`` byte pieces become UTF-8 again (an incomplete
  character becomes U+FFFD, never an exception), and the one space the dummy prefix added in
  front of the text is removed. Because of that last rule a word decoded alone loses its space,
  so streaming decodes the growing sequence and emits only the new suffix (``IncrementalDecoder``).
- **Chat.** ``apply_chat_template`` renders the checkpoint's ``chat_template``, or writes Meta's
  Llama 2 dialog format when it has none (``llama_np.text.base``).

What the slow and the fast tokenizer (``llama_np.text.tokenizer_fast``, for a checkpoint's
``tokenizer.json``) share lives in ``llama_np.text.base``. The tokenizer runs on the
``sentencepiece`` package; ``llama_np.text.bpe`` re-implements the encoder
in pure Python for reading.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import sentencepiece as spm

from llama_np.formats.files import atomic_write, is_file, read_bytes
from llama_np.formats.gguf import is_gguf_file
from llama_np.formats.locate import resolve_model_path
from llama_np.errors import CheckpointError, TokenizerError
from llama_np.inputs import is_integer
from llama_np.text.base import SPECIAL_TOKEN_NAMES, TOKENIZER_CONFIG_NAME, VERY_LARGE_INTEGER, TokenizerBase, _check_ids, _check_settings, _check_side, _check_text, _check_token_string, check_added_tokens, clean_up_tokenization, read_pretrained_settings
from llama_np.text.tokenizer_fast import TOKENIZER_FILE_NAME, LlamaTokenizerFast, read_gguf_vocabulary

SPIECE_UNDERLINE = "▁"  # sentencepiece's visible space, U+2581
VOCAB_FILE_NAME = "tokenizer.model"

# Appended to a serialized ModelProto, this sets normalizer_spec.add_dummy_prefix = false:
# protobuf merges a message that appears twice, so the later field wins. Bytes: field 3
# (normalizer_spec), length 2, holding field 3 (add_dummy_prefix) as the varint 0.
_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


def load_sentencepiece(path: str | os.PathLike, add_dummy_prefix: bool = True, model_bytes: bytes | None = None):
    """Load a sentencepiece ``tokenizer.model``, optionally with its dummy prefix turned off.

    Returns ``(processor, model_bytes)``; the bytes are the file as stored, for saving. Given
    ``model_bytes`` (a model built from a GGUF file's vocabulary), they are loaded instead and
    ``path`` only names where they came from. Raises TokenizerError naming the file if it is
    missing or not a sentencepiece model.
    """
    path = Path(path)
    if model_bytes is None and not is_file(path, TokenizerError):
        raise TokenizerError(
            f"{path} does not exist: a Llama tokenizer needs its sentencepiece model file"
        )
    if model_bytes is None:
        model_bytes = read_bytes(path, TokenizerError)
    proto = model_bytes if add_dummy_prefix else model_bytes + _NO_DUMMY_PREFIX
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(proto)
    except Exception as error:  # sentencepiece raises RuntimeError or OSError depending on version
        raise TokenizerError(
            f"{path} is not a valid sentencepiece model ({len(model_bytes)} bytes): {error}"
        ) from None
    if processor.get_piece_size() == 0:
        raise TokenizerError(f"{path} is a sentencepiece model with no pieces")
    if not 0 <= processor.unk_id() < processor.get_piece_size():
        # sentencepiece maps every unknown text to this id; without it a lookup fails later
        raise TokenizerError(f"{path} is a sentencepiece model with no unknown piece (unk_id "
                             f"{processor.unk_id()}); the file is corrupt")
    # sentencepiece loads pieces that are not UTF-8 but fails on each later use of them.
    try:
        processor.id_to_piece(list(range(processor.get_piece_size())))
    except UnicodeDecodeError as error:
        raise TokenizerError(f"{path} holds a piece that is not valid UTF-8 ({error}); the file is "
                             "corrupt") from None
    return processor, model_bytes


class LlamaTokenizer(TokenizerBase):
    """Llama 2's tokenizer on sentencepiece, matching Transformers 4.45.2's slow LlamaTokenizer.

    Args:
        vocab_file: path of the sentencepiece ``tokenizer.model``.
        unk_token, bos_token, eos_token, pad_token: the special tokens as strings. Llama 2 has
            no pad token; add one with ``add_special_tokens({"pad_token": "<pad>"})``.
        add_bos_token, add_eos_token: what encoding adds around each segment. They can be set
            on an existing tokenizer and take effect at once.
        legacy: True (the default, also for None) encodes every text chunk with sentencepiece's
            dummy prefix, as Meta's code does; False adds the prefix only at the start of the
            text and not after a special token. See ``_encode_chunk``.
        add_prefix_space: with legacy=False, whether the start of the text gets a "▁".
        padding_side, truncation_side: "right" or "left".
        model_max_length: the default limit for truncation and padding="max_length".
        additional_special_tokens: further strings to treat as special tokens.
        clean_up_tokenization_spaces: whether decode removes the space before punctuation
            ("a ." -> "a."), as Transformers' option of that name does; off for Llama.
        chat_template: a Jinja chat template (as in tokenizer_config.json) for
            ``apply_chat_template``; None writes the Llama 2 chat format.
        model_bytes: the sentencepiece model itself when it is not a file (built from a GGUF
            file's vocabulary); ``vocab_file`` then names the file it came from.
    """

    def __init__(
        self,
        vocab_file,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token=None,
        add_bos_token=True,
        add_eos_token=False,
        legacy=None,
        add_prefix_space=True,
        padding_side="right",
        truncation_side="right",
        model_max_length=VERY_LARGE_INTEGER,
        additional_special_tokens=None,
        clean_up_tokenization_spaces=False,
        chat_template=None,
        model_bytes=None,
    ):
        _check_settings(dict(add_bos_token=add_bos_token, add_eos_token=add_eos_token, legacy=legacy,
                             add_prefix_space=add_prefix_space, model_max_length=model_max_length,
                             clean_up_tokenization_spaces=clean_up_tokenization_spaces))
        self.legacy = True if legacy is None else legacy
        self.vocab_file = str(vocab_file)
        # legacy=False loads the model without its dummy prefix; the prefix is then added by
        # hand at the start of the text only (docs/reference.md §5.2).
        self.sp_model, self._model_bytes = load_sentencepiece(
            vocab_file, add_dummy_prefix=self.legacy, model_bytes=model_bytes
        )
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.add_prefix_space = add_prefix_space
        self.padding_side = _check_side("padding_side", padding_side)
        self.truncation_side = _check_side("truncation_side", truncation_side)
        self.model_max_length = model_max_length
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.chat_template = chat_template

        self.unk_token, self.bos_token, self.eos_token, self.pad_token = (
            unk_token,
            bos_token,
            eos_token,
            pad_token,
        )
        self.additional_special_tokens = list(additional_special_tokens or [])
        # Tokens matched as whole strings before sentencepiece sees the text: the special tokens
        # (found in the vocabulary or given new ids from vocab_size on).
        self.added_tokens_encoder: dict[str, int] = {}
        self._new_token_count = 0  # added tokens whose ids come after the sentencepiece pieces
        self._register_special_tokens()

    # ----------------------------------------------------------------------------------------
    # vocabulary and special tokens

    @property
    def vocab_size(self) -> int:
        """Number of sentencepiece pieces (added tokens not counted)."""
        return self.sp_model.get_piece_size()

    def __len__(self) -> int:
        """Vocabulary size including added tokens: the embedding matrix needs this many rows."""
        return self.vocab_size + self._new_token_count

    def get_vocab(self) -> dict[str, int]:
        """{token: id} for every sentencepiece piece and every added token."""
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def add_special_tokens(self, special_tokens: dict) -> int:
        """Set special tokens, e.g. ``{"pad_token": "<pad>"}``; returns how many new ids were made.

        A token not in the vocabulary gets the next free id (vocab size for the first one), so
        ``len(tokenizer)`` grows and the model's embedding must grow with it (the model's
        ``resize_token_embeddings(len(tokenizer))``; docs/reference.md §5.5).
        """
        if not isinstance(special_tokens, dict):
            raise TokenizerError(
                "add_special_tokens takes a dict such as {'pad_token': '<pad>'}, "
                f"got {special_tokens!r}"
            )
        before = len(self)
        for name, value in special_tokens.items():
            if name == "additional_special_tokens":
                values = list(value)
                for token in values:
                    _check_token_string(name, token)
                known = set(self.additional_special_tokens)
                self.additional_special_tokens += [t for t in values if t not in known]
            elif name in SPECIAL_TOKEN_NAMES:
                _check_token_string(name, value)
                setattr(self, name, value)
            else:
                raise TokenizerError(
                    f"unknown special token name {name!r}; expected one of "
                    f"{', '.join(SPECIAL_TOKEN_NAMES)} or additional_special_tokens"
                )
        self._register_special_tokens()
        return len(self) - before

    def _register_special_tokens(self):
        """Give every special token an id: its piece id if sentencepiece has it, else a new one.

        New ids are handed out in order from ``len(self)``. Every step here is linear in the
        number of special tokens, so a tokenizer with 100,000 of them loads in moments.
        """
        for token in self.all_special_tokens:
            if token in self.added_tokens_encoder:
                continue
            piece_id = self.sp_model.piece_to_id(token)
            if self.sp_model.id_to_piece(piece_id) == token:
                self.added_tokens_encoder[token] = piece_id
            else:
                self.added_tokens_encoder[token] = len(self)
                self._new_token_count += 1
        self._added_tokens_decoder = {i: token for token, i in self.added_tokens_encoder.items()}
        # Where a special token may start (its first letter), and how long the tokens are.
        first_letters = sorted({token[0] for token in self.added_tokens_encoder})
        self._special_token_starts = (
            re.compile("[" + "".join(map(re.escape, first_letters)) + "]")
            if first_letters
            else None
        )
        self._special_token_lengths = sorted(
            {len(token) for token in self.added_tokens_encoder}, reverse=True
        )

    # ----------------------------------------------------------------------------------------
    # text -> tokens -> ids

    def tokenize(self, text: str) -> list[str]:
        """Split ``text`` into sentencepiece pieces and special-token strings (no bos/eos)."""
        _check_text(text)
        nonlegacy = not self.legacy and len(text) > 0
        if nonlegacy:
            # One "▁" for the whole text, then no dummy prefix for any chunk. A literal "▁" in the
            # text is read as a space, as sentencepiece would read it.
            text = text.replace(SPIECE_UNDERLINE, " ")
            if self.add_prefix_space:
                text = SPIECE_UNDERLINE + text
        tokens = [
            token
            for chunk in self._split_on_special_tokens(text)
            for token in self._encode_chunk(chunk)
        ]
        # legacy=False, "<s>Hi" -> "▁<s>Hi": the lone "▁" before the special token belongs to no
        # word and is dropped.
        if nonlegacy and len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE:
            if tokens[1] in self.all_special_tokens:
                tokens = tokens[1:]
        return tokens

    def _split_on_special_tokens(self, text: str) -> list[str]:
        """ "Hello <s>." -> ["Hello ", "<s>", "."]; empty chunks dropped.

        From the left, at each place where a special token starts, the longest one that does is
        split out, so a token that is a prefix of another never wins. Only places holding the
        first letter of some special token are tried.
        """
        if self._special_token_starts is None:
            return [text] if text else []
        chunks, done = [], 0
        for start in self._special_token_starts.finditer(text):
            position = start.start()
            if position < done:  # inside the special token just split out
                continue
            for length in self._special_token_lengths:
                token = text[position : position + length]
                if token in self.added_tokens_encoder:
                    chunks += [text[done:position], token]
                    done = position + len(token)
                    break
        chunks.append(text[done:])
        return [chunk for chunk in chunks if chunk]

    def _encode_chunk(self, chunk: str) -> list[str]:
        """Pieces for one chunk: an added token is itself; other text goes through sentencepiece.

        legacy=True: sentencepiece adds its dummy prefix "▁" to every chunk, so in "Hello <s>."
        the "." after the special token becomes "▁" + "." (the extra space legacy=False avoids).
        legacy=False: the model has no dummy prefix; a chunk is encoded as written. A chunk that
        starts with a space is encoded behind the text "<unk>", whose pieces are cut off again:
        Transformers does this because some sentencepiece versions drop a "▁" that starts the
        input, and we do the same so the ids agree whatever the version.
        """
        if chunk in self.added_tokens_encoder:
            return [chunk]
        if self.legacy or not chunk.startswith((SPIECE_UNDERLINE, " ")):
            return self.sp_model.encode(chunk, out_type=str)
        unk_length = len(self.sp_model.encode(self.unk_token))
        pieces = self.sp_model.encode(self.unk_token + chunk, out_type=str)
        return pieces[unk_length:] if len(pieces) >= unk_length else pieces

    def _token_to_id(self, token: str) -> int:
        if token in self.added_tokens_encoder:
            return self.added_tokens_encoder[token]
        return self.sp_model.piece_to_id(token)  # the unk id for a string that is no piece

    def convert_tokens_to_ids(self, tokens):
        """A token -> its id, a list of tokens -> a list of ids; unknown strings give unk's id."""
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        if not isinstance(tokens, (list, tuple)):
            raise TokenizerError(f"convert_tokens_to_ids takes a token (str) or a list of them, got "
                                 f"{type(tokens).__name__} {tokens!r:.60}")
        return [self._token_to_id(_check_token_string("token", token)) for token in tokens]

    # ----------------------------------------------------------------------------------------
    # the four methods of the Transformers API (docs/reference.md §5.4)

    def get_special_tokens_mask(
        self, token_ids_0, token_ids_1=None, already_has_special_tokens=False
    ) -> list[int]:
        """1 where build_inputs_with_special_tokens puts bos/eos, 0 at the sequence's own tokens.

        With ``already_has_special_tokens=True`` the ids are a finished sequence and every id of
        a special token (unk included) is marked; a second sequence is then an error.
        """
        if already_has_special_tokens:
            if token_ids_1 is not None:
                raise TokenizerError(
                    "get_special_tokens_mask: pass one finished sequence when "
                    "already_has_special_tokens=True, not a pair"
                )
            special_ids = set(self.all_special_ids)
            return [1 if int(i) in special_ids else 0 for i in token_ids_0]
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None) -> list[int]:
        """0 for the first segment with its bos/eos, 1 for the second."""
        specials = int(self.add_bos_token) + int(self.add_eos_token)
        types = [0] * (len(token_ids_0) + specials)
        if token_ids_1 is not None:
            types += [1] * (len(token_ids_1) + specials)
        return types

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return len(self.build_inputs_with_special_tokens([], [] if pair else None))

    # ----------------------------------------------------------------------------------------
    # encoding a batch: __call__ and encode

    def __call__(
        self,
        text,
        text_pair=None,
        add_special_tokens=True,
        padding=False,
        truncation=None,
        max_length=None,
        return_tensors=None,
        return_attention_mask=None,
        return_token_type_ids=None,
        return_special_tokens_mask=False,
        padding_side=None,
    ) -> dict:
        """Encode a text or a list of texts into a dict of ``input_ids``, ``attention_mask``, ...

        Args:
            text: a string, or a list of strings (a batch).
            text_pair: an optional second segment per text (a string, or a list for a batch).
            padding: False / "do_not_pad"; True / "longest" (to the longest in the batch);
                "max_length" (to ``max_length``). Needs a pad token.
            truncation: False / "do_not_truncate"; True / "longest_first" (remove tokens from the
                longer segment first); "only_first"; "only_second". Truncation keeps room for
                bos/eos. None means False, unless max_length is given without padding: then
                "longest_first", as in Transformers.
            return_tensors: None for lists; "np" for int64 arrays of shape (B, T) — a single text
                gets B = 1.
            return_attention_mask: default True. return_token_type_ids: default False.
        Returns:
            dict with "input_ids" and, as asked, "attention_mask", "token_type_ids",
            "special_tokens_mask"; each a list (one text), a list of lists (a batch) or an array.
        """
        is_batch, texts, pairs = self._batch_inputs(text, text_pair, return_tensors)
        padding, truncation, max_length = self._padding_truncation_strategies(
            padding, truncation, max_length
        )
        if return_attention_mask is None:
            return_attention_mask = True

        rows = []
        for first, second in zip(texts, pairs):
            ids = self.convert_tokens_to_ids(self.tokenize(first))
            pair_ids = None if second is None else self.convert_tokens_to_ids(self.tokenize(second))
            rows.append(
                self._prepare_for_model(
                    ids,
                    pair_ids,
                    add_special_tokens,
                    truncation,
                    max_length,
                    return_token_type_ids,
                    return_special_tokens_mask,
                )
            )

        if padding == "longest":
            target = max(len(row["input_ids"]) for row in rows)
        elif padding == "max_length":
            target = max_length
        else:
            target = None
        side = _check_side("padding_side", padding_side or self.padding_side)
        for row in rows:
            if return_attention_mask:
                row["attention_mask"] = [1] * len(row["input_ids"])
            if target is not None:
                self._pad(row, target, side)

        return self._batch_output(rows, is_batch, return_tensors)

    def _prepare_for_model(
        self,
        ids,
        pair_ids,
        add_special_tokens,
        truncation,
        max_length,
        return_token_type_ids,
        return_special_tokens_mask,
    ) -> dict:
        """Truncate, add bos/eos, and build the per-token side lists for one example."""
        total = len(ids) + (len(pair_ids) if pair_ids is not None else 0)
        if add_special_tokens:
            total += self.num_special_tokens_to_add(pair=pair_ids is not None)
        if truncation is not None and max_length and total > max_length:
            ids, pair_ids = self._truncate(ids, pair_ids, total - max_length, truncation)

        row = {}
        if add_special_tokens:
            row["input_ids"] = self.build_inputs_with_special_tokens(ids, pair_ids)
            token_types = self.create_token_type_ids_from_sequences(ids, pair_ids)
            special_mask = self.get_special_tokens_mask(ids, pair_ids)
        else:
            row["input_ids"] = ids + (pair_ids or [])
            token_types = [0] * len(row["input_ids"])
            special_mask = [0] * len(row["input_ids"])
        if return_token_type_ids:
            row["token_type_ids"] = token_types
        if return_special_tokens_mask:
            row["special_tokens_mask"] = special_mask
        return row

    def _truncate(self, ids, pair_ids, n_remove, strategy):
        """Remove n_remove tokens: from the longer segment first, or only from one segment."""

        def cut(sequence, n):
            if n <= 0:
                return sequence
            return sequence[n:] if self.truncation_side == "left" else sequence[:-n]

        if strategy == "only_first" or (strategy == "longest_first" and pair_ids is None):
            if len(ids) > n_remove:
                return cut(ids, n_remove), pair_ids
            segment = "first"
        elif strategy == "longest_first":
            # Transformers' arithmetic: first level the two lengths, then split the rest evenly
            # (the odd token goes to the second segment).
            first_remove = min(abs(len(pair_ids) - len(ids)), n_remove)
            rest = n_remove - first_remove
            if len(ids) > len(pair_ids):
                ids_remove, pair_remove = first_remove + rest // 2, rest - rest // 2
            else:
                ids_remove, pair_remove = rest // 2, first_remove + rest - rest // 2
            return cut(ids, ids_remove), cut(pair_ids, pair_remove)
        else:  # only_second
            if pair_ids is None:
                return ids, pair_ids
            if len(pair_ids) > n_remove:
                return ids, cut(pair_ids, n_remove)
            segment = "second"
        # Transformers logs an error and leaves the sequence whole; so do we, with a warning.
        length = len(ids) if segment == "first" else len(pair_ids)
        warnings.warn(
            f"truncation={strategy!r} must remove {n_remove} tokens but the {segment} sequence "
            f"has only {length}; the sequence is left untruncated",
            stacklevel=4,
        )
        return ids, pair_ids

    def _pad(self, row: dict, length: int, side: str):
        """Pad one example's lists to ``length`` (nothing happens if it is already longer)."""
        missing = length - len(row["input_ids"])
        if missing <= 0:
            return
        fill = {
            "input_ids": self.pad_token_id,
            "attention_mask": 0,
            "token_type_ids": 0,
            "special_tokens_mask": 1,
        }
        for key, values in row.items():
            padding = [fill[key]] * missing
            row[key] = padding + values if side == "left" else values + padding

    # ----------------------------------------------------------------------------------------
    # ids -> tokens -> text

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        """One id -> one token, a sequence of ids -> a list of tokens."""
        if is_integer(ids):
            return self._id_to_token(int(ids))
        special_ids = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._id_to_token(i) for i in _check_ids(ids, len(self)) if i not in special_ids]

    def _id_to_token(self, index: int) -> str:
        if index in self._added_tokens_decoder:
            return self._added_tokens_decoder[index]
        if not 0 <= index < self.vocab_size:
            raise TokenizerError(
                f"token id {index} is outside the vocabulary (ids 0..{len(self) - 1})"
            )
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens) -> str:
        """Join tokens into text: special tokens as written, other runs decoded by sentencepiece.

        The "▁" that the prefix put before the first token is dropped first (docs/reference.md §5.3). With
        legacy=True a space is written before a special token that follows text, and the model's
        own decoder also drops the first "▁" of each run; these quirks are kept so decoded text
        matches Transformers.
        """
        tokens = list(tokens)
        if not tokens:
            return ""
        if tokens[0].startswith(SPIECE_UNDERLINE) and self.add_prefix_space:
            tokens[0] = tokens[0][1:]
        special = set(self.all_special_tokens)
        out, run, prev_is_special = "", [], False
        for i, token in enumerate(tokens):
            if token in special:
                if not prev_is_special and i != 0 and self.legacy:
                    out += " "
                out += self.sp_model.decode(run) + token
                prev_is_special, run = True, []
            else:
                if (
                    prev_is_special
                    and i == 1
                    and self.add_prefix_space
                    and not token.startswith(SPIECE_UNDERLINE)
                ):
                    out += " "
                run.append(token)
                prev_is_special = False
        return out + self.sp_model.decode(run)

    def decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None) -> str:
        """Text of a sequence of ids (or of one id). Out-of-vocabulary ids raise TokenizerError.

        An incomplete UTF-8 character at the end (a cut-off run of byte pieces) becomes U+FFFD.
        ``clean_up_tokenization_spaces`` (default: the tokenizer's setting) removes the space
        before punctuation, as Transformers' option of that name does.
        """
        if is_integer(token_ids):
            token_ids = [int(token_ids)]
        tokens = self.convert_ids_to_tokens(token_ids, skip_special_tokens=skip_special_tokens)
        text = self.convert_tokens_to_string(tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    # ----------------------------------------------------------------------------------------
    # files

    @classmethod
    def from_pretrained(cls, name_or_path, revision=None, gguf_file=None, **kwargs):
        """Load from a directory, a bundled model name or a repo id in the Hugging Face cache.

        The directory holds ``tokenizer.model``; ``tokenizer_config.json`` and
        ``special_tokens_map.json`` are read when present (the Transformers layout), and keyword
        arguments override them. A directory with ``tokenizer.json`` but no ``tokenizer.model``
        gets a ``LlamaTokenizerFast``, as Transformers' AutoTokenizer would give it.
        ``revision`` picks a branch, tag or commit of a cached repo id. A GGUF file (its path,
        or its directory and ``gguf_file``) gives the tokenizer of its ``tokenizer.ggml.*``
        vocabulary (``from_gguf``).
        """
        if gguf_file is None and is_gguf_file(name_or_path):
            return cls.from_gguf(name_or_path, **kwargs)
        try:
            directory = resolve_model_path(name_or_path, revision=revision)
        except CheckpointError as error:
            raise TokenizerError(str(error)) from None
        if gguf_file is not None:
            return cls.from_gguf(directory / gguf_file, **kwargs)
        vocab_file = directory / VOCAB_FILE_NAME
        if not is_file(vocab_file, TokenizerError):
            if is_file(directory / TOKENIZER_FILE_NAME, TokenizerError):
                return LlamaTokenizerFast.from_pretrained(directory, **kwargs)
            raise TokenizerError(
                f"{directory} has no {VOCAB_FILE_NAME} (the sentencepiece model a Llama "
                f"tokenizer needs) and no {TOKENIZER_FILE_NAME} (the tokenizers library's file)"
            )
        settings, added_tokens = read_pretrained_settings(directory)
        settings.update(kwargs)
        tokenizer = cls(vocab_file, **settings)
        check_added_tokens(tokenizer, added_tokens, directory / TOKENIZER_CONFIG_NAME)
        return tokenizer

    @classmethod
    def from_gguf(cls, path, **kwargs):
        """The tokenizer of a GGUF file: its vocabulary as a sentencepiece model, bos/eos/unk/pad
        and ``add_bos_token`` from its header, ``legacy=False`` as Transformers' tokenizer of a
        GGUF file behaves (``tokenizer_fast.read_gguf_vocabulary``, shared with
        ``LlamaTokenizerFast.from_gguf``); keyword arguments override these."""
        model_bytes, settings = read_gguf_vocabulary(path)
        settings.update(kwargs)
        return cls(path, model_bytes=model_bytes, **settings)

    def save_vocabulary(self, save_directory, filename_prefix=None) -> tuple[str]:
        """Write the sentencepiece model to ``save_directory/[prefix-]tokenizer.model``."""
        directory = Path(save_directory)
        if not directory.is_dir():
            raise TokenizerError(f"{directory} is not a directory")
        path = directory / ((filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE_NAME)
        atomic_write(path, [self._model_bytes])
        return (str(path),)

    def save_pretrained(self, save_directory) -> tuple[str, ...]:
        """Write tokenizer.model, tokenizer_config.json and special_tokens_map.json.

        The layout is Transformers', so its LlamaTokenizer.from_pretrained reads the directory too.
        """
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        settings = {"add_prefix_space": self.add_prefix_space, "legacy": self.legacy}
        paths = self._save_side_files(directory, "LlamaTokenizer", settings)
        return paths + self.save_vocabulary(directory)

    def __repr__(self):
        return (
            f"LlamaTokenizer(vocab_file={self.vocab_file!r}, vocab_size={self.vocab_size}, "
            f"len={len(self)}, legacy={self.legacy}, add_bos_token={self.add_bos_token}, "
            f"add_eos_token={self.add_eos_token}, "
            f"pad_token={self.pad_token!r}, padding_side={self.padding_side!r})"
        )


# --------------------------------------------------------------------------------------------
# streaming


# --------------------------------------------------------------------------------------------
# helpers


