"""A sentencepiece ``tokenizer.model`` written from a list of pieces, without protobuf.

A sentencepiece model file is one protobuf message, ``ModelProto``
(https://github.com/google/sentencepiece/blob/master/src/sentencepiece_model.proto). A GGUF
file keeps the same vocabulary as three arrays (``tokenizer.ggml.tokens``, ``.scores``,
``.token_type``, whose type numbers are sentencepiece's own), so writing those fields back gives
a model the ``sentencepiece`` library loads, and a ``LlamaTokenizer`` that encodes as the
original ``tokenizer.model`` did. Only the fields a Llama BPE model uses are written:

    ModelProto         1 pieces (repeated SentencePiece)  2 trainer_spec  3 normalizer_spec
    SentencePiece      1 piece (string)  2 score (float)  3 type (enum, NORMAL = 1 … BYTE = 6)
    TrainerSpec        3 model_type (BPE = 2)  35 byte_fallback  40 unk_id  41 bos_id
                       42 eos_id  43 pad_id (int32, -1 for none)
    NormalizerSpec     1 name ("identity")  3 add_dummy_prefix  4 remove_extra_whitespaces
                       5 escape_whitespaces

Protobuf's wire format: each field is a key ``(field number << 3) | wire type`` as a varint,
then its value — a varint (type 0: integers, enums, bools; a negative int32 as its 64-bit two's
complement), 4 little-endian bytes (type 5: float), or a length and that many bytes (type 2:
strings and messages).
"""

from __future__ import annotations

import struct

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE = 2


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint; a negative number as its 64-bit two's complement."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def integer_field(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(int(value))


def float_field(number: int, value: float) -> bytes:
    return varint(number << 3 | 5) + struct.pack("<f", value)


def bytes_field(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


def model_proto(pieces: list[str], scores, types, unk_id: int, bos_id: int, eos_id: int,
                pad_id: int = -1, add_dummy_prefix: bool = True) -> bytes:
    """The serialized ModelProto of a BPE model with these pieces, scores and piece types.

    Byte fallback is on when the pieces include BYTE ones (``<0x00>`` …), as in Llama 2's model;
    the normalizer is sentencepiece's "identity" with Llama 2's settings (spaces kept and escaped
    as "▁", no extra whitespace removed); ``add_dummy_prefix`` puts a "▁" before the text.
    """
    out = bytearray()
    for piece, score, piece_type in zip(pieces, scores, types):
        message = bytes_field(1, piece.encode("utf-8")) + float_field(2, float(score)) + integer_field(3, piece_type)
        out += bytes_field(1, message)
    trainer = (integer_field(3, BPE) + integer_field(35, any(t == BYTE for t in types))
               + integer_field(40, unk_id) + integer_field(41, bos_id) + integer_field(42, eos_id)
               + integer_field(43, pad_id))
    normalizer = (bytes_field(1, b"identity") + integer_field(3, add_dummy_prefix)
                  + integer_field(4, False) + integer_field(5, True))
    out += bytes_field(2, trainer) + bytes_field(3, normalizer)
    return bytes(out)
