"""Speed of llama_np beside Transformers, measured in the same run on the same checkpoint.

    /path/to/venv-with-torch/bin/python tests/benchmarks/bench_speed.py [--model tiny-shakespeare]

Needs torch and transformers (tests/reference/requirements.txt) besides llama_np. Reports, for
each implementation (float32, Transformers with eager attention, the same thread count): a
forward pass over a prompt (median of several runs) and greedy decoding with the KV cache in
new tokens per second; then llama_np's time as a ratio of Transformers'. Not a test: numbers
depend on the machine, so they live here and not in the test suite.
"""

import argparse
import statistics
import time

import numpy as np


def median_seconds(run, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-shakespeare")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import LlamaForCausalLM as TorchLlama

    from llama_np import LlamaForCausalLM
    from llama_np.formats.locate import resolve_model_path

    torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    ours = LlamaForCausalLM.from_pretrained(path)
    theirs = TorchLlama.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    vocab = ours.config.vocab_size
    ids = np.random.default_rng(0).integers(3, vocab, size=(1, args.prompt_tokens))
    ids_torch = torch.tensor(ids)

    ours(ids)  # first use widens the weights; keep that out of the timing
    forward_ours = median_seconds(lambda: ours(ids), args.repeats)
    with torch.no_grad():
        theirs(ids_torch)
        forward_theirs = median_seconds(lambda: theirs(ids_torch), args.repeats)

    def decode_ours():
        stats = {}
        ours.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=[], stats=stats)
        return stats["decode_steps"] / stats["decode_seconds"]

    def decode_theirs():
        with torch.no_grad():
            start = time.perf_counter()
            out = theirs(ids_torch, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(args.new_tokens - 1):
                out = theirs(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return (args.new_tokens - 1) / (time.perf_counter() - start)

    rate_ours = statistics.median(decode_ours() for _ in range(3))
    rate_theirs = statistics.median(decode_theirs() for _ in range(3))

    print(f"model {args.model}: {ours.num_parameters():,} parameters, {args.threads} threads, float32")
    print(f"forward over {args.prompt_tokens} tokens: llama_np {forward_ours * 1e3:.1f} ms, "
          f"Transformers {forward_theirs * 1e3:.1f} ms, ratio {forward_ours / forward_theirs:.3g}x")
    print(f"greedy decoding: llama_np {rate_ours:.1f} tokens/s, Transformers {rate_theirs:.1f} tokens/s, "
          f"time ratio {rate_theirs / rate_ours:.3g}x")


if __name__ == "__main__":
    main()
