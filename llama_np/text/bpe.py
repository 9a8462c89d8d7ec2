"""Sentencepiece BPE encoding in pure Python, for reading next to the tokenizer notebook.

``LlamaTokenizer`` uses the ``sentencepiece`` package; this module shows what it does for a BPE
model like Llama 2's and gives the same ids (the tests check it on every sample text):

1. **Read the model file.** ``tokenizer.model`` is a protobuf ``ModelProto``: a list of pieces,
   each a string, a score and a type (normal, unknown, control, byte, ...), plus the normalizer
   settings. ``read_model`` decodes the protobuf wire format by hand, so no protobuf library
   is needed.
2. **Normalise.** Spaces become "▁" and, with ``add_dummy_prefix``, one "▁" goes in front, so the
   first word looks like every other word. Llama 2 uses the identity normalization: nothing else
   changes.
3. **Merge.** Start from single characters (Unicode code points). Among all neighbouring pairs
   whose concatenation is a piece, merge the one with the highest score (the leftmost on a tie);
   repeat until no pair merges. In a trained BPE model a piece's score is minus its merge rank,
   so this replays the training merges in order.
4. **Byte fallback.** A symbol that is not a piece (a character training never kept) is spelled
   as its UTF-8 bytes, each the piece ``<0xNN>``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from llama_np.formats.files import is_file, read_bytes
from llama_np.errors import TokenizerError

SPIECE_UNDERLINE = "▁"

# sentencepiece_model.proto: SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# sentencepiece_model.proto: TrainerSpec.ModelType
UNIGRAM_MODEL, BPE_MODEL = 1, 2


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    """A base-128 varint starting at ``position``: 7 bits per byte, low bits first."""
    value, shift = 0, 0
    while True:
        if position >= len(data):
            raise TokenizerError("protobuf data ends inside a varint")
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            return value, position
        shift += 7


def protobuf_fields(data: bytes):
    """Yield ``(field_number, value)`` for each field of a serialized protobuf message.

    Each field starts with a varint key = field_number << 3 | wire_type. Wire type 0 is a varint,
    1 eight bytes, 2 a length-prefixed byte string (strings and nested messages), 5 four bytes.
    """
    position = 0
    while position < len(data):
        key, position = _read_varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _read_varint(data, position)
        elif wire_type == 1:
            value, position = data[position : position + 8], position + 8
        elif wire_type == 2:
            length, position = _read_varint(data, position)
            value, position = data[position : position + length], position + length
        elif wire_type == 5:
            value, position = data[position : position + 4], position + 4
        else:
            raise TokenizerError(f"unsupported protobuf wire type {wire_type} for field {number}")
        if position > len(data):
            raise TokenizerError(f"protobuf field {number} runs past the end of the data")
        yield number, value


@dataclass
class BPEModel:
    """The parts of a sentencepiece BPE model that encoding needs."""

    pieces: list[str]  # piece string by id
    scores: list[float]  # piece score by id
    types: list[int]  # piece type by id (NORMAL, BYTE, ...)
    add_dummy_prefix: bool = True
    unk_id: int = 0
    model_type: int = BPE_MODEL  # what the trainer built: BPE for Llama, never unigram
    unk_piece: str = "<unk>"  # the trainer's name for the unknown piece
    merge_scores: dict[str, float] = field(init=False, repr=False)  # normal pieces only
    piece_ids: dict[str, int] = field(init=False, repr=False)
    byte_ids: dict[int, int] = field(init=False, repr=False)  # byte value -> id of <0xNN>

    def __post_init__(self):
        self.merge_scores = {
            p: s for p, s, t in zip(self.pieces, self.scores, self.types) if t == NORMAL
        }
        self.piece_ids = {
            p: i for i, (p, t) in enumerate(zip(self.pieces, self.types)) if t == NORMAL
        }
        self.byte_ids = {
            int(p[3:5], 16): i for i, (p, t) in enumerate(zip(self.pieces, self.types)) if t == BYTE
        }

    def normalize(self, text: str) -> str:
        """Identity normalization: spaces -> "▁", plus the dummy prefix."""
        text = text.replace(" ", SPIECE_UNDERLINE)
        return SPIECE_UNDERLINE + text if self.add_dummy_prefix else text

    def encode_as_pieces(self, text: str) -> list[str]:
        """The merged symbols of ``text`` (before byte fallback)."""
        if not text:
            return []
        symbols = list(self.normalize(text))  # one symbol per code point
        while True:
            best, best_score = None, None
            for i in range(len(symbols) - 1):
                score = self.merge_scores.get(symbols[i] + symbols[i + 1])
                if score is not None and (best is None or score > best_score):
                    best, best_score = i, score
            if best is None:
                return symbols
            symbols[best : best + 2] = [symbols[best] + symbols[best + 1]]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` exactly as ``sentencepiece`` gives them (no bos/eos)."""
        ids = []
        for symbol in self.encode_as_pieces(text):
            if symbol in self.piece_ids:
                ids.append(self.piece_ids[symbol])
            elif self.byte_ids:
                ids.extend(self.byte_ids[byte] for byte in symbol.encode("utf-8"))
            else:
                ids.append(self.unk_id)
        return ids


def read_model(path: str | Path, model_bytes: bytes | None = None) -> BPEModel:
    """Read a sentencepiece ``tokenizer.model`` (a serialized ModelProto) into a BPEModel.

    Given ``model_bytes`` (a model built from a GGUF file's vocabulary, which is no file), they
    are read instead and ``path`` only names where they came from in errors.

    ModelProto fields used: 1 = repeated SentencePiece {1: piece, 2: score (float), 3: type},
    2 = TrainerSpec {3: model_type (default unigram), 45: unk_piece}, 3 = NormalizerSpec
    {3: add_dummy_prefix (default true)}.
    """
    path = Path(path)
    if model_bytes is None and not is_file(path, TokenizerError):
        raise TokenizerError(f"{path} does not exist")
    data = read_bytes(path, TokenizerError) if model_bytes is None else model_bytes
    pieces, scores, types, add_dummy_prefix = [], [], [], True
    model_type, unk_piece = UNIGRAM_MODEL, "<unk>"
    try:
        for number, value in protobuf_fields(data):
            if number == 1:
                piece, score, kind = "", 0.0, NORMAL
                for sub_number, sub_value in protobuf_fields(value):
                    if sub_number == 1:
                        piece = sub_value.decode("utf-8")
                    elif sub_number == 2:
                        score = struct.unpack("<f", sub_value)[0]
                    elif sub_number == 3:
                        kind = sub_value
                pieces.append(piece)
                scores.append(score)
                types.append(kind)
            elif number == 2:
                for sub_number, sub_value in protobuf_fields(value):
                    if sub_number == 3:
                        model_type = sub_value
                    elif sub_number == 45:
                        unk_piece = sub_value.decode("utf-8")
            elif number == 3:
                for sub_number, sub_value in protobuf_fields(value):
                    if sub_number == 3:
                        add_dummy_prefix = bool(sub_value)
        if not pieces:
            raise TokenizerError("it holds no sentencepiece pieces")
        unk_id = types.index(UNKNOWN) if UNKNOWN in types else 0
        # ValueError: a byte piece not spelled <0xNN>
        return BPEModel(pieces, scores, types, add_dummy_prefix=add_dummy_prefix, unk_id=unk_id,
                        model_type=model_type, unk_piece=unk_piece)
    except (TokenizerError, UnicodeDecodeError, struct.error, AttributeError, TypeError, ValueError) as error:
        raise TokenizerError(f"{path} is not a valid sentencepiece model: {error}") from None
