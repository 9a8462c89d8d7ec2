"""Classroom checkers: does a student's component behave like the library's?

    from llama_np.exercises import check_rms_norm

    def rms_norm(x, weight, eps):
        ...                                   # the student's version

    check_rms_norm(rms_norm)                  # prints a short report, returns a CheckResult

Each checker takes a function with the signature of the library's own and runs it on several
cases taken from the bundled model's real activations (with odd shapes, padding and several
ratios of query to key/value heads added). The report gives the share of values that are correct,
the worst case and a hint that names the likely mistake — the mistake is recognised by comparing
the student's outputs with wrong versions of the function written in the checker. Exceptions
raised by the student's function (NotImplementedError included) are reported, not raised.

The result has ``.passed``, ``.fraction_correct``, ``.hint`` (None when passed), ``.mistake``
(the name of the recognised mistake, if any), ``.cases`` and ``.report``.

    check_rms_norm(fn)            fn(x, weight, eps)                       layers.rms_norm
    check_rope_frequencies(fn)    fn(head_dim, theta) -> inv_freq          layers.default_rope_frequencies
    check_apply_rope(fn)          fn(x, cos, sin)                          layers.apply_rope
    check_apply_rope(fn, "meta")  fn(x, cos, sin)                          layers.apply_rope_interleaved
    check_repeat_kv(fn)           fn(x, n_rep)                             layers.repeat_kv
    check_attention(fn)           fn(q, k, v, mask, scaling) -> (out, w)   layers.attention
    check_swiglu(fn)              fn(x, gate_proj, up_proj, down_proj)     layers.swiglu
    check_pooling(fn)             fn(input_ids, pad_token_id) -> (B,)      model.last_non_pad_index
    check_top_p(fn)               fn(logits, top_p) -> logits              generation.top_p_filter
    check_head_ablation(fn)       fn(z, o_proj, head) -> (B, T, D)         model.self_attention (per-head o_proj)

The backward checkers grade against ``llama_np.training.backward``, the functions value_and_grad runs:

    check_rms_norm_backward(fn)       fn(grad, normalized, scale, weight) -> (grad_x, grad_weight)
    check_softmax_backward(fn)        fn(grad, weights) -> grad_scores
    check_repeat_kv_backward(fn)      fn(grad, n_rep) -> (B, KV, S, hd)
    check_cross_entropy_backward(fn)  fn(logits, targets, ignore_index=-100) -> (N, C)
"""

from llama_np.exercises.ablation import check_head_ablation
from llama_np.exercises.backprop import (
    check_cross_entropy_backward,
    check_repeat_kv_backward,
    check_rms_norm_backward,
    check_softmax_backward,
)
from llama_np.exercises.checking import CaseOutcome, CheckResult
from llama_np.exercises.components import (
    check_apply_rope,
    check_attention,
    check_repeat_kv,
    check_rms_norm,
    check_rope_frequencies,
    check_swiglu,
)
from llama_np.exercises.heads import check_pooling, check_top_p

__all__ = [
    "check_rms_norm", "check_rope_frequencies", "check_apply_rope", "check_repeat_kv",
    "check_attention", "check_swiglu", "check_pooling", "check_top_p", "check_head_ablation",
    "check_rms_norm_backward", "check_softmax_backward", "check_repeat_kv_backward",
    "check_cross_entropy_backward", "CheckResult",
    "CaseOutcome",
]
