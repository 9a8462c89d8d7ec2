"""Training: a backward function beside each forward function, value_and_grad, optimizers, LoRA.

    backward.py        one *_backward per function of layers.py (and the losses), same order
    model_backward.py  the backward of model.py, and value_and_grad(model, input_ids, ...)
    optim.py           AdamW, SGD, clip_grad_norm, cosine_with_warmup
    lora.py            LoRA adapters with PEFT's semantics and files
    dpo.py             direct preference optimisation, TRL's sigmoid loss

Import the modules themselves (``from llama_np.training.optim import AdamW``); this package
imports nothing, so that ``pretrained.py`` can use ``lora`` before ``model.py`` exists.
``llama_np.value_and_grad`` is the same function as ``model_backward.value_and_grad``.
"""
