"""GPTQ: quantise a linear layer's weights so that its *outputs* on real inputs change least,
written as llama.cpp's Q4_0 or Q4_1 blocks.

Round-to-nearest (weights/quants.py) rounds every weight on its own. GPTQ (Frantar, Ashkboos,
Hoefler and Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", 2022, https://arxiv.org/abs/2210.17323) rounds the columns of a weight matrix
W (rows, columns) one at a time and moves each column's rounding error onto the columns not yet
rounded, weighted by how the layer's inputs correlate, so that ||W X − Ŵ X||² stays small for
the inputs X (columns, n) the layer sees. The steps, as in the paper's Algorithm 1:

1. Hessian. For the loss ||W X − Ŵ X||², summed over the rows, the Hessian with respect to
   a row is H = 2 X Xᵀ / n, (columns, columns); it depends only on the inputs. Columns whose
   input is always zero (H_ii = 0) cannot matter: they get H_ii = 1 and weight 0 before rounding.
2. Damping. λ = damp · mean(diag H) is added to the diagonal, so that H is safely positive
   definite (the paper's "dampening", 1 % of the mean diagonal).
3. Cholesky of the inverse. U = upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U). Row i of U holds,
   up to the scale U_ii, how the error of column i is spread over the columns after it once the
   columns before it are fixed (the paper's section 3, "Cholesky reformulation").
4. Column by column, for i = 0 … columns − 1 (in act-order, by decreasing H_ii):
       q_i     = quantise(w_i)                  with the scale of the block column i belongs to
       e_i     = (w_i − q_i) / U_ii
       w_j    -= e_i · U_ij   for every later column j
   ``block_size`` columns are done in a batch and their accumulated update applied to the rest
   of the matrix at once (the paper's "lazy batch updates"), which gives the same numbers.
5. Groups. Every 32 consecutive columns of a row (one llama.cpp block) share a scale (and, in
   Q4_1, a minimum). Without act-order a block's scale is computed when GPTQ reaches its first
   column, from the weights as the earlier columns' errors have left them (the paper's
   "group-wise" quantisation, GPTQ's ``static_groups=False``). With act-order the columns are
   visited out of order, so each block's scale is computed from the original weights before
   starting (``static_groups=True`` in AutoGPTQ): a block is still 32 consecutive columns of the
   file, which is what keeps the result readable as Q4_0/Q4_1.

The scales follow llama.cpp's round-to-nearest encoders (quants.py) — Q4_0: d = x_max / −8 and
q = clip(floor(x / d + 8.5), 0, 15); Q4_1: d = (max − min) / 15, m = min and
q = clip(floor((x − m) / d + 0.5), 0, 15) — and each rounded column is the float16 scale's
value, so the error fed forward is the error of the numbers the file will decode to. With H a
multiple of the identity (inputs uncorrelated and of equal size) no error is fed forward and the
blocks equal round-to-nearest's byte for byte.
"""

from __future__ import annotations

import numpy as np

from llama_np.errors import InputError
from llama_np.weights import quants
from llama_np.weights.codecs import Q4_0, Q4_1, BlockCodec

GROUP = quants.QK  # columns sharing a scale: one Q4_0/Q4_1 block
TYPES = (Q4_0, Q4_1)


def hessian(inputs: np.ndarray) -> np.ndarray:
    """H = 2 X Xᵀ / n from the layer's inputs, (n, columns) -> (columns, columns) float64."""
    x = np.asarray(inputs, dtype=np.float64).reshape(-1, inputs.shape[-1])  # (n, columns)
    return 2 * (x.T @ x) / x.shape[0]


def block_scales(weights: np.ndarray, codec: BlockCodec) -> tuple[np.ndarray, np.ndarray]:
    """(rows, 32) float32 -> the float32 scale d and minimum m of each block, (rows, 1) each,
    as llama.cpp's round-to-nearest encoder chooses them (m is 0 for Q4_0)."""
    if codec is Q4_0:
        return quants.signed_absolute_max(weights) / np.float32(-8), np.zeros((len(weights), 1), np.float32)
    low, high = weights.min(axis=-1, keepdims=True), weights.max(axis=-1, keepdims=True)
    return (high - low) / np.float32(15), low


def round_column(column: np.ndarray, d: np.ndarray, m: np.ndarray, codec: BlockCodec) -> tuple[np.ndarray, np.ndarray]:
    """(rows,) float32 weights of one column and its block's d, m (rows,) -> the integers q 0..15
    and the float32 values the file decodes them to (with d and m rounded to float16)."""
    offset = np.float32(8.5) if codec is Q4_0 else np.float32(0.5)
    q = np.clip(np.floor((column - m) * quants.reciprocal(d) + offset), 0, 15).astype(np.uint8)
    d16, m16 = d.astype(np.float16).astype(np.float32), m.astype(np.float16).astype(np.float32)
    values = d16 * (q.astype(np.float32) - 8) if codec is Q4_0 else d16 * q.astype(np.float32) + m16
    return q, values


def blocks_of(q: np.ndarray, d: np.ndarray, m: np.ndarray, codec: BlockCodec) -> np.ndarray:
    """Integers q (rows, columns) 0..15 and scales d, m (rows, columns / 32) -> the blocks
    (rows · columns / 32, 18 or 20) uint8 in llama.cpp's layout, row after row."""
    q = q.reshape(-1, GROUP)
    d, m = d.reshape(-1, 1), m.reshape(-1, 1)
    scales = [quants.f16_bytes(d)] if codec is Q4_0 else [quants.f16_bytes(d), quants.f16_bytes(m)]
    return np.concatenate(scales + [quants.pack_nibbles(q)], axis=-1)


def gptq_quantize(weight: np.ndarray, inputs: np.ndarray, codec: BlockCodec = Q4_0, damp: float = 0.01,
                  act_order: bool = False, block_size: int = 128) -> np.ndarray:
    """Quantise one linear layer with GPTQ (the steps are in this module's docstring).

    weight (rows, columns), the layer computes x @ weight.T; inputs (..., columns), what the
    layer saw on calibration text; ``codec`` ``codecs.Q4_0`` or ``codecs.Q4_1``. Returns its blocks of ``weight``,
    (rows · columns / 32, bytes per block) uint8, row after row as a GGUF file stores them;
    ``weights.quants.q4_0`` (or ``q4_1``) decodes them.
    """
    if codec not in TYPES:
        raise InputError(f"GPTQ writes {' or '.join(c.name for c in TYPES)}, not {codec.name}")
    if block_size % GROUP:
        raise InputError(f"GPTQ's lazy batches must be whole groups of {GROUP} columns, not {block_size}")
    rows, columns = weight.shape
    if columns % GROUP or inputs.shape[-1] != columns:
        raise InputError(f"GPTQ needs rows that are whole blocks of {GROUP} and inputs of {columns} "
                         f"numbers; got a weight {weight.shape} and inputs {inputs.shape}")
    w = np.array(weight, dtype=np.float64)  # (rows, columns), updated as errors are fed forward
    h = hessian(inputs)
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h[np.diag_indices(columns)] += damp * np.mean(np.diag(h))

    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(columns)
    groups = np.arange(columns) // GROUP  # the block of each column, in the file's order
    d = np.zeros((rows, columns // GROUP), np.float32)
    m = np.zeros((rows, columns // GROUP), np.float32)
    if act_order:  # scales from the original weights: a block's columns are visited out of order
        for g in range(columns // GROUP):
            d[:, g:g + 1], m[:, g:g + 1] = block_scales(w[:, g * GROUP:(g + 1) * GROUP].astype(np.float32), codec)
    w, h = w[:, order], h[np.ix_(order, order)]  # work in visiting order
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H⁻¹ = Uᵀ U
    except np.linalg.LinAlgError:
        raise InputError(f"the Hessian of the calibration inputs {inputs.shape} is not positive definite "
                         f"even with damp={damp}; give more calibration tokens or a larger damp") from None

    q = np.zeros((rows, columns), np.uint8)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        errors = np.zeros((rows, end - start))
        for i in range(start, end):
            g = groups[order[i]]
            if not act_order and order[i] % GROUP == 0:  # first column of its block: choose the scale now
                d[:, g:g + 1], m[:, g:g + 1] = block_scales(w[:, i:i + GROUP].astype(np.float32), codec)
            q[:, i], values = round_column(w[:, i].astype(np.float32), d[:, g], m[:, g], codec)
            errors[:, i - start] = (w[:, i] - values) / u[i, i]
            w[:, i + 1:end] -= np.outer(errors[:, i - start], u[i, i + 1:end])
        w[:, end:] -= errors @ u[start:end, end:]  # the batch's errors on the columns after it

    q_file = np.empty_like(q)
    q_file[:, order] = q  # back to the file's column order
    return blocks_of(q_file, d, m, codec)


def layer_error(weight: np.ndarray, quantised: np.ndarray, inputs: np.ndarray) -> float:
    """||X Wᵀ − X Ŵᵀ|| / ||X Wᵀ||: the relative change of a layer's outputs on ``inputs`` (..., columns)."""
    x = np.asarray(inputs, dtype=np.float64).reshape(-1, inputs.shape[-1])
    exact = x @ np.asarray(weight, np.float64).T
    return float(np.linalg.norm(exact - x @ np.asarray(quantised, np.float64).T) / np.linalg.norm(exact))
