"""``llama-np generate`` and ``llama-np chat``: sampling flags checked before any output, the
text streamed as it is generated, and the speed over the new tokens on stderr.
"""

from __future__ import annotations

import math
import re
import sys
import warnings

import numpy as np

from llama_np.cli.common import (EXIT_OK, UsageError, load_with_tokenizer, plural, prompt_text, read_stdin,
                                 require_model_class)
from llama_np.errors import InputError
from llama_np.formats.gguf import is_gguf_file
from llama_np.formats.locate import resolve_model_path
from llama_np.model import LlamaForCausalLM
from llama_np.text.streaming import TextStreamer

DEFAULT_MAX_NEW_TOKENS = 64


def sampling_settings(args) -> dict:
    """generate() keyword arguments from the sampling options; None = the checkpoint's default.

    Giving any sampling option turns sampling on; ``--greedy`` turns it off and cannot be
    combined with them (they would be silently ignored). Every option is checked here, before
    anything is printed, so an error names the flag rather than generate()'s argument.
    """
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    given = [f"--{name.replace('_', '-')}" for name, value in sampling.items() if value is not None]
    if args.greedy and given:
        raise UsageError(f"--greedy picks the most likely token; it cannot be combined with {', '.join(given)}")
    check_sampling_options(args)
    do_sample = False if args.greedy else (True if given else None)
    return dict(max_new_tokens=args.max_new_tokens, do_sample=do_sample,
                repetition_penalty=args.repetition_penalty, seed=args.seed,
                allow_past_context=args.allow_past_context, **sampling)


def check_sampling_options(args) -> None:
    """UsageError naming the first generation flag that generate() could not use."""
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature > 0):
        raise UsageError(f"--temperature must be a finite number > 0, got {args.temperature:g}; "
                         "for greedy decoding use --greedy")
    if args.top_k is not None and args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 turns the top-k limit off), got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:  # False for NaN too
        raise UsageError(f"--top-p must be in (0, 1] (1 keeps every token), got {args.top_p:g}")
    penalty = args.repetition_penalty
    if penalty is not None and not (math.isfinite(penalty) and penalty > 0):
        raise UsageError(f"--repetition-penalty must be a finite number > 0 (1 means no penalty), got {penalty:g}")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {args.seed}")


class EchoingStreamer(TextStreamer):
    """A TextStreamer that prints ``echo`` (the prompt as typed) when generate() hands it the
    prompt ids. generate() does so only after checking every setting, so a setting it refuses
    (say, from generation_config.json) is reported before any output, not after the prompt."""

    def __init__(self, tokenizer, echo: str | None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.echo = echo

    def put(self, token_ids) -> str:
        if self.echo is not None:
            print(self.echo, end="", flush=True)
            self.echo = None
        return super().put(token_ids)


def stream_continuation(model, tokenizer, prompt_ids: list[int], settings: dict, stats: dict,
                        echo: str | None = None) -> list[int]:
    """Generate after ``prompt_ids`` and print ``echo`` then the new text as it comes; return
    the new ids.

    The streamer is first given the prompt (printing only ``echo``) so that each new piece is
    decoded as part of the whole sequence: a word decoded alone would lose its leading space
    (docs/reference.md §5.3).
    """
    streamer = EchoingStreamer(tokenizer, echo)
    sequences = model.generate(np.array([prompt_ids], dtype=np.int64), streamer=streamer,
                               stats=stats, **settings)
    return [int(i) for i in sequences[0, len(prompt_ids):]]


def speed_report(stats: dict, prompt_length: int) -> str:
    """Generation speed over the new tokens only, as llama.cpp reports its eval rate.

    The pass over the prompt also yields the first new token, so the rate is the cached decode
    steps after it divided by their time; the prompt pass is reported apart.
    """
    steps, seconds = stats["decode_steps"], stats["decode_seconds"]
    rate = f"{steps / seconds:.1f} tokens/s" if steps and seconds > 0 else "- tokens/s"
    return (f"{plural(stats['new_tokens'], 'new token')}; {rate} over the {plural(steps, 'step')} after the "
            f"first (prompt of {plural(prompt_length, 'token')} read in {stats['prompt_seconds']:.2f} s, "
            "not counted)")


def check_checkpoint_temperature(model, settings: dict, name_or_path) -> None:
    """A generation_config.json may hold temperature 0, harmless while it decodes greedily; a
    sampling flag other than --temperature turns sampling on and would then use it."""
    defaults = model.generation_config
    sampling = defaults.do_sample if settings["do_sample"] is None else settings["do_sample"]
    temperature = defaults.temperature
    usable = isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0
    if sampling and settings["temperature"] is None and not usable:
        raise UsageError(f"sampling needs a temperature > 0, and the generation_config.json of {name_or_path} "
                         f"has temperature {temperature!r}; give --temperature too")


def load_for_generation(args, verb: str, settings: dict):
    """The causal LM and tokenizer for generate and chat, refused before any output when the
    checkpoint is of another kind or its defaults cannot serve the sampling flags."""
    require_model_class(args.model, LlamaForCausalLM, verb)
    model, tokenizer = load_with_tokenizer(LlamaForCausalLM, args.model)
    check_checkpoint_temperature(model, settings, args.model)
    return model, tokenizer


def run_generate(args) -> int:
    settings = sampling_settings(args)
    model, tokenizer = load_for_generation(args, "generate", settings)
    prompt = prompt_text(args)
    prompt_ids = tokenizer.encode(prompt)
    stats: dict = {}
    stream_continuation(model, tokenizer, prompt_ids, settings, stats, echo=prompt)
    print(speed_report(stats, len(prompt_ids)), file=sys.stderr)
    return EXIT_OK


CHAT_EXIT_WORDS = ("exit", "quit")


def warn_without_chat_template(tokenizer, name_or_path) -> None:
    """Warn when a model with no chat_template gets the Llama 2 format without being a Llama 2
    chat model (judged by its name or path, e.g. meta-llama/Llama-2-7b-chat-hf)."""
    if tokenizer.chat_template is not None:
        return
    where = name_or_path if is_gguf_file(name_or_path) else resolve_model_path(name_or_path)
    names = f"{name_or_path} {where}".lower()
    if re.search(r"llama-?2[^/]*chat", names):
        return
    warnings.warn(f"{name_or_path} has no chat_template in its tokenizer_config.json and is not a "
                  "Llama 2 chat model; the conversation is written in Llama 2's [INST] format, "
                  "which this model may not have been trained on")


def run_chat(args) -> int:
    """Read one user turn per line from stdin; answer each with the whole dialog as context.

    The dialog is written by the tokenizer's ``apply_chat_template``: in the model's own
    ``chat_template`` from tokenizer_config.json when it has one, else in Meta's Llama 2 format
    (``<s>[INST] <<SYS>>…<</SYS>> user [/INST] answer </s><s>[INST] …``), with one warning when
    the model is not a Llama 2 chat model. The session ends at end of input, an empty line, or
    "exit" / "quit". In a terminal, Ctrl-C stops the answer being written and returns to the
    prompt (the interrupted turn is left out of the dialog), as llama.cpp's chat does; at the
    prompt it ends the chat. Off a terminal each message is echoed as "> message" before its
    answer, so a transcript shows where each reply starts. ``--speed`` prints each turn's speed.
    """
    settings = sampling_settings(args)
    if sys.stdin is None:
        raise InputError("chat reads one message per line from stdin, and stdin is closed; run it in a "
                         "terminal or give it input (a pipe or a file)")
    model, tokenizer = load_for_generation(args, "chat", settings)
    warn_without_chat_template(tokenizer, args.model)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message; an empty line, 'exit' or Ctrl-D ends the chat.", file=sys.stderr)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = read_stdin("a message", one_line=True)
        text = line.strip()
        if not line or not text or text.lower() in CHAT_EXIT_WORDS:
            return EXIT_OK
        if not interactive:
            print(f"> {text}", flush=True)
        messages.append({"role": "user", "content": text})
        prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        stats: dict = {}
        try:
            new_ids = stream_continuation(model, tokenizer, prompt_ids, settings, stats)
        except KeyboardInterrupt:
            if not interactive:
                raise
            print("\n[interrupted: this answer is left out of the conversation]", file=sys.stderr)
            messages.pop()
            continue
        if args.speed:
            print(speed_report(stats, len(prompt_ids)), file=sys.stderr)
        answer = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": answer})
