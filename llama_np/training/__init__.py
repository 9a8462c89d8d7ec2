"""Training: a backward function beside each forward function, and value_and_grad.

    backward.py        one *_backward per function of layers.py (and the losses), same order
    model_backward.py  the backward of model.py, and value_and_grad(model, input_ids, ...)
"""

from llama_np.training.model_backward import value_and_grad

__all__ = ["value_and_grad"]
