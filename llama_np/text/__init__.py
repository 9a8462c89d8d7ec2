"""Text in and out: the sentencepiece BPE, the two Llama tokenizers, chats, streaming decode."""
