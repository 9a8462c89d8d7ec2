"""LlamaTokenizerFast: Llama's tokenizer on the ``tokenizers`` library, equal to Transformers
4.45.2's ``LlamaTokenizerFast``, with the same API as ``llama_np.text.tokenizer.LlamaTokenizer``.

A checkpoint may ship ``tokenizer.json`` (the ``tokenizers`` library's file) instead of, or
beside, sentencepiece's ``tokenizer.model``. That file spells out the whole pipeline:

- **normalizer** (legacy=True): prepend "▁" to the text and turn every space into "▁";
- **pre-tokenizer** (legacy=False instead): ``Metaspace``, the same replacement with the "▁" put
  in front of the first chunk only, so a chunk after a special token gets none;
- **model**: BPE over the sentencepiece pieces, with ``merges`` listed in order of priority and
  ``byte_fallback`` spelling an unknown character as its ``<0xNN>`` pieces;
- **post-processor**: a ``TemplateProcessing`` that puts ``<s>`` (and ``</s>``) around each
  segment as ``add_bos_token`` / ``add_eos_token`` say (``update_post_processor``);
- **decoder**: "▁" -> " ", byte pieces -> UTF-8, join, and strip the one leading space.

When a directory holds only ``tokenizer.model``, ``convert_sentencepiece`` builds that same
``tokenizer.json`` the way Transformers' Llama converter does: the merges come from the pieces'
scores (a piece's score is minus its merge rank, see llama_np/text/bpe.py), which is why one BPE can be
written both ways (notebook 01). A GGUF file's ``tokenizer.ggml.*`` vocabulary is converted
the same way from the sentencepiece model ``formats.gguf`` builds from it, with legacy=False as
Transformers reads it (``from_gguf``, ``read_gguf_vocabulary``).

The ``tokenizers`` library is the optional extra ``llama-np[fast]``; without it, building a
``LlamaTokenizerFast`` is a TokenizerError that says what to install.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from llama_np.errors import CheckpointError, TokenizerError
from llama_np.formats.files import atomic_write, atomic_write_text, is_file, read_bytes
from llama_np.formats.gguf import gguf_tokenizer, is_gguf_file, read_gguf
from llama_np.formats.locate import resolve_model_path
from llama_np.inputs import is_integer
from llama_np.text.base import (
    SPECIAL_TOKEN_NAMES,
    TOKENIZER_CONFIG_NAME,
    VERY_LARGE_INTEGER,
    TokenizerBase,
    _check_ids,
    _check_settings,
    _check_side,
    _check_text,
    _check_token_string,
    check_added_tokens,
    clean_up_tokenization,
    read_pretrained_settings,
)
from llama_np.text.bpe import BPE_MODEL, CONTROL, USER_DEFINED, read_model

TOKENIZER_FILE_NAME = "tokenizer.json"
VOCAB_FILE_NAME = "tokenizer.model"
SPIECE_UNDERLINE = "▁"  # sentencepiece's visible space, U+2581


def _tokenizers():
    """The ``tokenizers`` package, or a TokenizerError naming the extra that installs it."""
    try:
        import tokenizers  # optional extra llama-np[fast]
    except ImportError:
        raise TokenizerError(
            "LlamaTokenizerFast (a checkpoint's tokenizer.json) needs the 'tokenizers' package: "
            "pip install 'llama-np[fast]'"
        ) from None
    return tokenizers


# --------------------------------------------------------------------------------------------
# tokenizer.model -> tokenizer.json, as Transformers' LlamaConverter builds it


def sentencepiece_merges(pieces: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges, best first, from sentencepiece pieces and scores (Transformers'
    ``generate_merges`` with ``vocab_scores``).

    Every way of cutting a piece into two pieces of the vocabulary is a merge with that piece's
    score; merges are sorted by score, highest first, then by the length of the left and of the
    right part, longest first. Ties keep the order of the piece's id, then of the two parts' ids.
    """
    ids = {piece: i for i, piece in enumerate(pieces)}
    merges = []
    for piece, score in zip(pieces, scores):
        local = [(piece[:cut], piece[cut:], score) for cut in range(1, len(piece))
                 if piece[:cut] in ids and piece[cut:] in ids]
        merges += sorted(local, key=lambda merge: (ids[merge[0]], ids[merge[1]]))
    merges.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def convert_sentencepiece(vocab_file, legacy: bool = True, add_prefix_space: bool = True,
                          model_bytes: bytes | None = None):
    """A ``tokenizers.Tokenizer`` equal to what Transformers 4.45.2's ``LlamaConverter`` builds.

    The first three pieces (``<unk>``, ``<s>``, ``</s>``) get score 0; control pieces (and
    user-defined ones, not special) become added tokens. legacy=True normalises with
    ``Prepend("▁")`` (when ``add_prefix_space``) and ``Replace(" ", "▁")``; legacy=False has no
    normalizer but a ``Metaspace`` pre-tokenizer that prepends "▁" to the first chunk only
    (``prepend_scheme="first"``, or ``"never"`` without ``add_prefix_space``). The post-processor
    is set by ``LlamaTokenizerFast.update_post_processor``. Given ``model_bytes`` (a GGUF file's
    vocabulary as a sentencepiece model), they are converted and ``vocab_file`` only names
    where they came from.
    """
    tokenizers = _tokenizers()
    from tokenizers import decoders, models, normalizers, pre_tokenizers  # optional extra llama-np[fast]

    model = read_model(vocab_file, model_bytes)
    if model.model_type != BPE_MODEL:
        raise TokenizerError(
            f"{vocab_file} is a sentencepiece model of type {model.model_type}, not BPE (type "
            f"{BPE_MODEL}); Llama's tokenizer is BPE, and llama_np converts only BPE models"
        )
    scores = [0.0, 0.0, 0.0] + list(model.scores[3:])
    vocab = {piece: i for i, piece in enumerate(model.pieces)}
    tokenizer = tokenizers.Tokenizer(models.BPE(
        vocab, sentencepiece_merges(model.pieces, scores), unk_token=model.unk_piece,
        fuse_unk=True, byte_fallback=True, dropout=None,
    ))
    tokenizer.add_tokens([
        tokenizers.AddedToken(piece, normalized=False, special=kind == CONTROL)
        for piece, kind in zip(model.pieces, model.types) if kind in (CONTROL, USER_DEFINED)
    ])
    if legacy:
        prepend = [normalizers.Prepend(prepend=SPIECE_UNDERLINE)] if add_prefix_space else []
        tokenizer.normalizer = normalizers.Sequence(
            prepend + [normalizers.Replace(pattern=" ", content=SPIECE_UNDERLINE)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=SPIECE_UNDERLINE, prepend_scheme="first" if add_prefix_space else "never",
            split=False)
    strip = [decoders.Strip(content=" ", left=1)] if add_prefix_space else []
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()] + strip)
    return tokenizer


def read_gguf_vocabulary(path) -> tuple[bytes, dict]:
    """A GGUF file's ``tokenizer.ggml.*`` vocabulary as a sentencepiece model (serialized
    ModelProto) and the settings both tokenizer classes take from it: bos/eos/unk/pad,
    ``add_bos_token``, ``add_eos_token``, the chat template, and ``legacy=False``.

    legacy=False because that is how Transformers tokenizes a GGUF file's vocabulary: a
    ``Metaspace`` pre-tokenizer and no normalizer, so "▁" goes in front of the text only, not in
    front of each chunk after a special token ("<s> and" gives "<s>", "▁and", not "<s>", "▁",
    "▁and"). Any failure, a file with no llama vocabulary included, is one TokenizerError
    naming the file.
    """
    try:
        model_bytes, settings = gguf_tokenizer(read_gguf(path))
    except CheckpointError as error:
        raise TokenizerError(str(error)) from None
    settings.update(legacy=False)
    return model_bytes, settings


# --------------------------------------------------------------------------------------------
# the tokenizer


@contextlib.contextmanager
def _rust_panics_silenced():
    """stderr (file descriptor 2) pointed at /dev/null for a moment: a Rust panic inside the
    tokenizers library prints its own message there before it becomes a Python exception."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class LlamaTokenizerFast(TokenizerBase):
    """Llama's tokenizer on the ``tokenizers`` library, matching Transformers 4.45.2's
    ``LlamaTokenizerFast``.

    Args:
        vocab_file: sentencepiece ``tokenizer.model``, converted when there is no
            ``tokenizer_file`` (or when ``add_prefix_space`` is given, as in Transformers).
        tokenizer_file: ``tokenizer.json``.
        legacy, add_prefix_space: how a converted ``tokenizer.model`` places "▁" (see
            ``convert_sentencepiece``); a ``tokenizer.json`` already says it.
        model_bytes: the sentencepiece model itself when it is not a file (built from a GGUF
            file's vocabulary, see ``from_gguf``); ``vocab_file`` then names the file it came from.
        padding_side: "left" by default, Transformers' class default for the fast Llama
            tokenizer (the slow one pads on the right); checkpoints usually set it.
        The other arguments are those of ``LlamaTokenizer``.
    """

    def __init__(
        self,
        vocab_file=None,
        tokenizer_file=None,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token=None,
        add_bos_token=True,
        add_eos_token=False,
        legacy=None,
        add_prefix_space=None,
        padding_side="left",
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
        self.add_prefix_space = add_prefix_space
        self.vocab_file = None if vocab_file is None else str(vocab_file)
        self._model_bytes = model_bytes
        self.tokenizer_file = None if tokenizer_file is None else str(tokenizer_file)
        self._tokenizer = self._build_backend()
        # Padding or truncation saved in tokenizer.json: Transformers takes the pad token from it
        # and then sets both per call (off unless asked), so they never apply to tokenize().
        saved_padding = self._tokenizer.padding
        if pad_token is None and saved_padding is not None:
            pad_token = saved_padding.get("pad_token")
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.padding_side = _check_side("padding_side", padding_side)
        self.truncation_side = _check_side("truncation_side", truncation_side)
        self.model_max_length = model_max_length
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.chat_template = chat_template
        self.unk_token, self.bos_token, self.eos_token, self.pad_token = (
            unk_token, bos_token, eos_token, pad_token)
        self.additional_special_tokens = list(additional_special_tokens or [])
        self._register_special_tokens(self.all_special_tokens)
        self._add_bos_token = add_bos_token
        self._add_eos_token = add_eos_token
        self.update_post_processor()

    def _build_backend(self):
        """Load tokenizer.json, or convert tokenizer.model (Transformers' order of preference)."""
        tokenizers = _tokenizers()
        if self.tokenizer_file is not None and self.add_prefix_space is None:
            path = Path(self.tokenizer_file)
            if not is_file(path, TokenizerError):
                raise TokenizerError(f"{path} does not exist")
            data = read_bytes(path, TokenizerError)
            try:
                backend = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
                with _rust_panics_silenced():  # a garbage normalizer panics on any text: say so now
                    backend.encode("Hello, world! 123 日本語")
                return backend
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as error:  # plain Exceptions, and a Rust panic (PanicException, a BaseException)
                raise TokenizerError(
                    f"{path} is not a tokenizers file the 'tokenizers' library can read "
                    f"({len(data)} bytes): {error}"
                ) from None
        if self.vocab_file is not None:
            return convert_sentencepiece(self.vocab_file, self.legacy,
                                         True if self.add_prefix_space is None else self.add_prefix_space,
                                         model_bytes=self._model_bytes)
        if self.tokenizer_file is not None:
            raise TokenizerError(
                f"add_prefix_space={self.add_prefix_space!r} changes how tokenizer.json is built, "
                f"so it must be rebuilt from tokenizer.model, and there is none beside "
                f"{self.tokenizer_file} (Transformers fails the same way): leave add_prefix_space "
                "unset"
            )
        raise TokenizerError("LlamaTokenizerFast needs a tokenizer_file (tokenizer.json) or a "
                             "vocab_file (tokenizer.model)")

    @property
    def backend_tokenizer(self):
        """The ``tokenizers.Tokenizer`` doing the work."""
        return self._tokenizer

    # ----------------------------------------------------------------------------------------
    # vocabulary and special tokens

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary (added tokens not counted)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Vocabulary size including added tokens: the embedding matrix needs this many rows."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        """{token: id} for the added tokens of tokenizer.json and those added since, by id."""
        decoder = self._tokenizer.get_added_tokens_decoder()
        return {decoder[i].content: i for i in sorted(decoder)}

    def _register_special_tokens(self, tokens) -> int:
        """Add special tokens the backend does not know yet (as Transformers does on loading
        and in ``add_special_tokens``); returns how many new ids were made."""
        tokenizers = _tokenizers()
        known = self.added_tokens_encoder
        new = [tokenizers.AddedToken(token, rstrip=False, lstrip=False, normalized=False, special=True)
               for token in tokens if token not in known]
        return self._tokenizer.add_special_tokens(new) if new else 0

    def add_special_tokens(self, special_tokens: dict) -> int:
        """Set special tokens, e.g. ``{"pad_token": "<pad>"}``; returns how many new ids were made.

        As in ``LlamaTokenizer``, a token not in the vocabulary gets the next free id. As in
        Transformers, a new bos or eos token does not change the post-processor until
        ``update_post_processor()`` is called.
        """
        if not isinstance(special_tokens, dict):
            raise TokenizerError(
                "add_special_tokens takes a dict such as {'pad_token': '<pad>'}, "
                f"got {special_tokens!r}"
            )
        for name, value in special_tokens.items():
            if name == "additional_special_tokens":
                if not isinstance(value, (list, tuple)):  # a string would be one token per letter
                    raise TokenizerError(f"additional_special_tokens must be a list of tokens, "
                                         f"got {value!r:.80}")
                values = [_check_token_string(name, token) for token in value]
                known = set(self.additional_special_tokens)
                self.additional_special_tokens += [t for t in values if t not in known]
            elif name in SPECIAL_TOKEN_NAMES:
                setattr(self, name, _check_token_string(name, value))
            else:
                raise TokenizerError(
                    f"unknown special token name {name!r}; expected one of "
                    f"{', '.join(SPECIAL_TOKEN_NAMES)} or additional_special_tokens"
                )
        return self._register_special_tokens(self.all_special_tokens)

    def _token_to_id(self, token: str) -> int:
        index = self._tokenizer.token_to_id(token)
        return self.unk_token_id if index is None else index

    def convert_tokens_to_ids(self, tokens):
        """A token -> its id, a list of tokens -> a list of ids; unknown strings give unk's id."""
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        if not isinstance(tokens, (list, tuple)):
            raise TokenizerError(f"convert_tokens_to_ids takes a token (str) or a list of them, got "
                                 f"{type(tokens).__name__} {tokens!r:.60}")
        return [self._token_to_id(_check_token_string("token", token)) for token in tokens]

    # ----------------------------------------------------------------------------------------
    # the post-processor and the four methods of the Transformers API (docs/reference.md §5.4)

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, value: bool):
        _check_settings({"add_bos_token": value})
        self._add_bos_token = value
        self.update_post_processor()

    @property
    def add_eos_token(self) -> bool:
        return self._add_eos_token

    @add_eos_token.setter
    def add_eos_token(self, value: bool):
        _check_settings({"add_eos_token": value})
        self._add_eos_token = value
        self.update_post_processor()

    def update_post_processor(self):
        """Rebuild the backend's post-processor from bos/eos and add_bos_token/add_eos_token.

        As Transformers 4.45.2 writes it: single ``"<s>:0 $A:0 </s>:0"`` and pair
        ``"<s>:0 $A:0 </s>:0 <s>:1 $B:1 </s>:1"``, each special token present only if its flag is
        on (``:1`` marks the second segment's token type).
        """
        from tokenizers import processors  # optional extra llama-np[fast]

        for flag, name in (("add_bos_token", "bos_token"), ("add_eos_token", "eos_token")):
            if getattr(self, flag) and getattr(self, name) is None:
                raise TokenizerError(f"{flag} is true but {name} is null, so there is no token to "
                                     f"add: set {flag} to false or give a {name}")
        bos, eos = self.bos_token, self.eos_token
        single = (f"{(bos + ':0 ') if self.add_bos_token else ''}$A:0"
                  f"{(' ' + eos + ':0') if self.add_eos_token else ''}")
        pair = (f"{single}{(' ' + bos + ':1') if self.add_bos_token else ''} $B:1"
                f"{(' ' + eos + ':1') if self.add_eos_token else ''}")
        special_tokens = []
        if self.add_bos_token:
            special_tokens.append((bos, self.bos_token_id))
        if self.add_eos_token:
            special_tokens.append((eos, self.eos_token_id))
        self._tokenizer.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=special_tokens)

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None,
                                already_has_special_tokens=False) -> list[int]:
        """1 at every special token of a finished sequence, 0 elsewhere.

        Transformers' fast tokenizer supports only ``already_has_special_tokens=True`` with one
        sequence (it asserts so); anything else is a TokenizerError here. To get the mask of
        the tokens encoding adds, pass ``return_special_tokens_mask=True`` when encoding.
        """
        if not already_has_special_tokens or token_ids_1 is not None:
            raise TokenizerError(
                "LlamaTokenizerFast.get_special_tokens_mask takes one finished sequence with "
                "already_has_special_tokens=True, as in Transformers; pass "
                "return_special_tokens_mask=True when encoding, or use the slow LlamaTokenizer"
            )
        special_ids = set(self.all_special_ids)
        return [1 if int(i) in special_ids else 0 for i in token_ids_0]

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None) -> list[int]:
        """0 for each id of the first sequence, 1 for the second; bos/eos are not counted
        (Transformers' fast tokenizer uses the generic method; encoding itself gives the
        token types of the post-processor)."""
        types = [0] * len(token_ids_0)
        if token_ids_1 is not None:
            types += [1] * len(token_ids_1)
        return types

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return self._tokenizer.num_special_tokens_to_add(pair)

    # ----------------------------------------------------------------------------------------
    # text -> ids

    def tokenize(self, text: str) -> list[str]:
        """The tokens of ``text`` (no bos/eos)."""
        return self._encode_batch([_check_text(text)], add_special_tokens=False)[0].tokens

    def _encode_batch(self, inputs, add_special_tokens):
        """The backend's encode_batch; its errors (e.g. truncation) become TokenizerErrors."""
        try:
            return self._tokenizer.encode_batch(inputs, add_special_tokens=add_special_tokens)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # plain Exceptions, and a Rust panic (a garbage Precompiled charsmap, a
            # Split regex that backtracks for ever) raised as PanicException, a BaseException
            raise TokenizerError(f"the tokenizers library cannot encode this input with "
                                 f"{self.tokenizer_file or 'this tokenizer'}: {type(error).__name__}: "
                                 f"{str(error)[:200]}") from None

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
        """Encode a text or a list of texts, as ``LlamaTokenizer.__call__`` (same arguments).

        Truncation and padding are done by the backend, as in Transformers: a truncation that
        cannot remove enough tokens from the segment it may cut is a TokenizerError (the slow
        tokenizer warns and leaves the text whole).
        """
        is_batch, texts, pairs = self._batch_inputs(text, text_pair, return_tensors)
        padding, truncation, max_length = self._padding_truncation_strategies(
            padding, truncation, max_length)
        side = _check_side("padding_side", padding_side or self.padding_side)
        # Transformers' rule: one text with an empty second segment is encoded as one text.
        has_pairs = text_pair is not None if is_batch else bool(text_pair)
        inputs = list(zip(texts, pairs)) if has_pairs else texts
        try:
            if truncation is not None:
                self._tokenizer.enable_truncation(max_length, stride=0, strategy=truncation,
                                                  direction=self.truncation_side)
            if padding is not None:
                self._tokenizer.enable_padding(
                    direction=side, pad_id=self.pad_token_id, pad_type_id=0,
                    pad_token=self.pad_token, length=max_length if padding == "max_length" else None)
            encodings = self._encode_batch(inputs, add_special_tokens)
        finally:  # the settings are this call's only, as in Transformers
            self._tokenizer.no_truncation()
            self._tokenizer.no_padding()

        rows = []
        for encoding in encodings:
            row = {"input_ids": encoding.ids}
            if return_token_type_ids:
                row["token_type_ids"] = encoding.type_ids
            if return_attention_mask is None or return_attention_mask:
                row["attention_mask"] = encoding.attention_mask
            if return_special_tokens_mask:
                row["special_tokens_mask"] = encoding.special_tokens_mask
            rows.append(row)
        return self._batch_output(rows, is_batch, return_tensors)

    # ----------------------------------------------------------------------------------------
    # ids -> text

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        """One id -> one token, a sequence of ids -> a list of tokens."""
        if is_integer(ids):
            return self._tokenizer.id_to_token(_check_ids([ids], len(self))[0])
        special_ids = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(i) for i in _check_ids(ids, len(self))
                if i not in special_ids]

    def convert_tokens_to_string(self, tokens) -> str:
        """Join tokens into text with the backend's decoder (a tokenizer.json with ``"decoder":
        null`` has none: its tokens are joined by spaces, as the library's own decode does)."""
        tokens = [_check_token_string("token", token) for token in tokens]
        if self._tokenizer.decoder is None:
            return " ".join(tokens)
        return self._guarded(lambda: self._tokenizer.decoder.decode(tokens), "decode these tokens")

    def _guarded(self, work, what: str):
        """``work()``, with whatever the tokenizers library raises (a Rust panic included) as one
        TokenizerError."""
        try:
            return work()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:
            raise TokenizerError(f"the tokenizers library cannot {what} with "
                                 f"{self.tokenizer_file or 'this tokenizer'}: {type(error).__name__}: "
                                 f"{str(error)[:200]}") from None

    def decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None) -> str:
        """Text of a sequence of ids (or of one id). Out-of-vocabulary ids raise TokenizerError.

        The backend decodes; a byte piece that does not complete a UTF-8 character becomes
        U+FFFD.
        """
        if is_integer(token_ids):
            token_ids = [token_ids]
        ids = _check_ids(token_ids, len(self))
        text = self._guarded(lambda: self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens),
                             "decode these ids")
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    # ----------------------------------------------------------------------------------------
    # files

    @classmethod
    def from_pretrained(cls, name_or_path, revision=None, gguf_file=None, **kwargs) -> "LlamaTokenizerFast":
        """Load from a directory, a bundled model name or a repo id in the Hugging Face cache.

        Reads ``tokenizer.json`` when there is one, else converts ``tokenizer.model``;
        ``tokenizer_config.json`` and ``special_tokens_map.json`` as ``LlamaTokenizer`` does.
        A GGUF file (its path, or its directory and ``gguf_file``) gives the tokenizer of its
        ``tokenizer.ggml.*`` vocabulary (``from_gguf``).
        """
        if gguf_file is None and is_gguf_file(name_or_path):
            return cls.from_gguf(name_or_path, **kwargs)
        try:
            directory = resolve_model_path(name_or_path, revision=revision)
        except CheckpointError as error:
            raise TokenizerError(str(error)) from None
        if gguf_file is not None:
            return cls.from_gguf(directory / gguf_file, **kwargs)
        tokenizer_file, vocab_file = directory / TOKENIZER_FILE_NAME, directory / VOCAB_FILE_NAME
        files = {
            "tokenizer_file": tokenizer_file if is_file(tokenizer_file, TokenizerError) else None,
            "vocab_file": vocab_file if is_file(vocab_file, TokenizerError) else None,
        }
        if files == {"tokenizer_file": None, "vocab_file": None}:
            raise TokenizerError(f"{directory} has neither {TOKENIZER_FILE_NAME} nor "
                                 f"{VOCAB_FILE_NAME}: there is no tokenizer to load")
        settings, added_tokens = read_pretrained_settings(directory)
        settings.update(kwargs)
        tokenizer = cls(**files, **settings)
        check_added_tokens(tokenizer, added_tokens, directory / TOKENIZER_CONFIG_NAME)
        return tokenizer

    @classmethod
    def from_gguf(cls, path, **kwargs) -> "LlamaTokenizerFast":
        """The tokenizer of a GGUF file, as ``LlamaTokenizer.from_gguf`` reads it
        (``read_gguf_vocabulary``): its vocabulary converted as a ``tokenizer.model`` is, with
        ``legacy=False``; keyword arguments override the file's settings."""
        _tokenizers()  # say what to install before reading the file
        model_bytes, settings = read_gguf_vocabulary(path)
        settings.update(kwargs)
        return cls(vocab_file=path, model_bytes=model_bytes, **settings)

    def _has_sentencepiece_model(self) -> bool:
        """Whether there is a sentencepiece model to save: the bytes built from a GGUF file, or
        the ``tokenizer.model`` the tokenizer was loaded with."""
        return self._model_bytes is not None or (self.vocab_file is not None
                                                 and os.path.isfile(self.vocab_file))

    def save_vocabulary(self, save_directory, filename_prefix=None) -> tuple[str]:
        """Write the sentencepiece model to ``save_directory/[prefix-]tokenizer.model``.

        Only a tokenizer loaded with a ``tokenizer.model`` (copied) or a GGUF file (its
        vocabulary as a sentencepiece model, never the GGUF file itself) has one, as in
        Transformers.
        """
        if not self._has_sentencepiece_model():
            raise TokenizerError(
                "this LlamaTokenizerFast was loaded without a tokenizer.model, so it has no "
                "sentencepiece vocabulary to save; save_pretrained writes its tokenizer.json"
            )
        directory = Path(save_directory)
        if not directory.is_dir():
            raise TokenizerError(f"{directory} is not a directory")
        path = directory / ((filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE_NAME)
        if self._model_bytes is not None:
            atomic_write(path, [self._model_bytes])
        elif os.path.abspath(path) != os.path.abspath(self.vocab_file):
            atomic_write(path, [read_bytes(Path(self.vocab_file), TokenizerError)])
        return (str(path),)

    def save_pretrained(self, save_directory) -> tuple[str, ...]:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json, and
        tokenizer.model when the tokenizer has one (``save_vocabulary``); Transformers reads the
        directory too."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        # Transformers names the class without "Fast" in tokenizer_config.json.
        paths = self._save_side_files(directory, "LlamaTokenizer", {"legacy": self.legacy})
        tokenizer_path = directory / TOKENIZER_FILE_NAME
        atomic_write_text(tokenizer_path, self._tokenizer.to_str(pretty=True))
        paths += (str(tokenizer_path),)
        if self._has_sentencepiece_model():
            paths += self.save_vocabulary(directory)
        return paths

    def __repr__(self):
        return (
            f"LlamaTokenizerFast(tokenizer_file={self.tokenizer_file!r}, "
            f"vocab_file={self.vocab_file!r}, vocab_size={self.vocab_size}, len={len(self)}, "
            f"add_bos_token={self.add_bos_token}, add_eos_token={self.add_eos_token}, "
            f"pad_token={self.pad_token!r}, padding_side={self.padding_side!r})"
        )
