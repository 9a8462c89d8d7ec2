"""Decoding while tokens arrive: text that grows by whole characters as ids are added.
"""

from __future__ import annotations
import sys
import numpy as np
from llama_np.text.base import TokenizerBase
from llama_np.errors import TokenizerError
from llama_np.inputs import is_integer


class IncrementalDecoder:
    """Turn token ids arriving one (or a few) at a time into text, without losing spaces.

    Decoding each new id on its own loses the space in front of a word ("▁Banana" alone decodes
    to "Banana"), and a character spelled as several byte pieces cannot be decoded until its last
    byte arrives. So this decodes the whole sequence so far and returns only what is new, holding
    back a trailing incomplete character (U+FFFD) until it is complete (docs/reference.md §5.3).

    The joined output equals ``tokenizer.decode(all_ids)`` with one exception: with legacy=True
    and special tokens kept, Transformers' decode writes a space in front of the text that
    precedes a special token ("<s>Hello" becomes "<s> Hello</s>" once "</s>" arrives). Text
    already returned cannot move, so that space is returned just before the special token
    instead ("<s>Hello </s>"): the same characters, one space in a different place.

        decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
        for token_id in new_ids:
            print(decoder.put(token_id), end="")
        print(decoder.end())
    """

    def __init__(self, tokenizer: TokenizerBase, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.decoded = ""  # the decoded text whose characters have been returned

    def put(self, token_ids) -> str:
        """Add ids (an int, a list, or an array of shape (n,) or (1, n)); return the new text."""
        self.token_ids += _flat_ids(token_ids)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip_special_tokens)
        return self._advance(text[: len(text.rstrip("\ufffd"))])

    def end(self) -> str:
        """Return whatever is still held back (e.g. an incomplete character) and start afresh."""
        rest = self._advance(
            self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip_special_tokens)
        )
        self.token_ids, self.decoded = [], ""
        return rest

    def _advance(self, text: str) -> str:
        """The part of ``text`` not returned yet; remember ``text`` as returned."""
        previous, self.decoded = self.decoded, text
        if text.startswith(previous):
            return text[len(previous) :]
        # The legacy space (see the class docstring): one " " inserted into the returned text.
        split = next((i for i, (a, b) in enumerate(zip(previous, text)) if a != b), len(text))
        if text[split : split + 1] == " " and text[split + 1 :].startswith(previous[split:]):
            return " " + text[len(previous) + 1 :]
        return text[len(previous) :]


class TextStreamer(IncrementalDecoder):
    """Print text as ``generate(..., streamer=TextStreamer(tokenizer))`` produces it.

    ``put`` receives the prompt first and then each new token; with ``skip_prompt=True`` the
    prompt is not printed. ``end`` prints what is left and a newline.
    """

    def __init__(self, tokenizer, skip_prompt=False, skip_special_tokens=True, file=None):
        super().__init__(tokenizer, skip_special_tokens=skip_special_tokens)
        self.skip_prompt = skip_prompt
        self.file = file
        self._next_is_prompt = True

    def put(self, token_ids) -> str:
        if self._next_is_prompt and self.skip_prompt:
            self._next_is_prompt = False
            # Decode the prompt so the new text is measured from its end, but print nothing.
            super().put(token_ids)
            return ""
        self._next_is_prompt = False
        new_text = super().put(token_ids)
        print(new_text, end="", flush=True, file=self.file or sys.stdout)
        return new_text

    def end(self) -> str:
        rest = super().end()
        print(rest, flush=True, file=self.file or sys.stdout)
        self._next_is_prompt = True
        return rest


def _flat_ids(token_ids) -> list[int]:
    if is_integer(token_ids):
        return [int(token_ids)]
    array = np.asarray(token_ids)
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise TokenizerError(
            f"streaming takes ids of shape (n,) or (1, n), got {array.shape} {array.dtype}"
        )
    return [int(i) for i in array]
