"""Training: a backward function beside each forward function, value_and_grad, optimizers, LoRA.

    backward.py        one *_backward per function of layers.py (and the losses), same order
    model_backward.py  the backward of model.py, and value_and_grad(model, input_ids, ...)
    optim.py           AdamW, SGD, clip_grad_norm, cosine_with_warmup
    lora.py            LoRA adapters with PEFT's semantics and files
    dpo.py             direct preference optimisation, TRL's sigmoid loss
    loop.py            train(model, batches, optimizer, steps, ...): the loop, with eval loss and a bar

Import the modules themselves (``from llama_np.training.optim import AdamW``); this package
imports nothing, so that ``pretrained.py`` can use ``lora`` before ``model.py`` exists.
``llama_np.value_and_grad`` is the same function as ``model_backward.value_and_grad``, and
``llama_np.train`` and ``llama_np.training.train`` are ``loop.train`` (imported on first use).
"""


def __getattr__(name):
    if name == "train":
        from llama_np.training.loop import train  # not at the top: loop needs model.py, which needs lora
        return train
    raise AttributeError(f"module 'llama_np.training' has no attribute {name!r}")
