"""Training: a backward function beside each forward function, value_and_grad, optimizers.

    backward.py        one *_backward per function of layers.py (and the losses), same order
    model_backward.py  the backward of model.py, and value_and_grad(model, input_ids, ...)
    optim.py           AdamW, SGD, clip_grad_norm, cosine_with_warmup
"""

from llama_np.training.model_backward import value_and_grad
from llama_np.training.optim import SGD, AdamW, clip_grad_norm, cosine_with_warmup

__all__ = ["value_and_grad", "AdamW", "SGD", "clip_grad_norm", "cosine_with_warmup"]
