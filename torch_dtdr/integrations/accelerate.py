"""Hugging Face ``accelerate``: ``Accelerator.save_state`` / ``load_state``
write and read the models' weights as DTDR through accelerate's own hooks::

    from accelerate import Accelerator
    from torch_dtdr.integrations.accelerate import use_dtdr

    accelerator = Accelerator()
    model, optim = accelerator.prepare(model, optim)
    use_dtdr(accelerator, codec="dtdr", parity="strong")
    accelerator.save_state("ckpt/step-100")      # model.dtdr (model_1.dtdr, ...) instead of model.safetensors
    accelerator.load_state("ckpt/step-100")      # decoded straight into the prepared models

The save hook writes each model's state dict to ``model.dtdr`` (the first
model) or ``model_<i>.dtdr`` and removes it from the list accelerate would
write; the load hook decodes those files into the models in place
(:func:`torch_dtdr.load_model`, strict) and removes them from the list
accelerate would load. accelerate has no hook for the other states: the
optimizer, scheduler, sampler, scaler and RNG files are still written by
accelerate itself (``torch.save`` / pickle), unchanged.
"""

from __future__ import annotations

import os

from ..api import save
from ..modules import load_model

__all__ = ["use_dtdr", "weights_name"]


def weights_name(index: int) -> str:
    """The file model ``index`` is stored in: ``model.dtdr``, ``model_1.dtdr``, ..."""
    return "model.dtdr" if index == 0 else f"model_{index}.dtdr"


def use_dtdr(accelerator, *, codec="dtdr", parity="default", errors: str = "strict", **save_kwargs):
    """Register the save and load pre-hooks on ``accelerator``; returns their
    two ``RemovableHandle`` objects. ``errors="strict"`` refuses weights that
    are not bit-exact after parity repair."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for index, state in enumerate(weights):
                save(dict(state), os.path.join(output_dir, weights_name(index)), codec=codec, parity=parity,
                     **save_kwargs)
        weights.clear()  # accelerate writes no safetensors copy

    def load_hook(models, input_dir):
        for index, model in enumerate(models):
            load_model(model, os.path.join(input_dir, weights_name(index)), errors=errors)
        models.clear()  # already loaded

    return (accelerator.register_save_state_pre_hook(save_hook),
            accelerator.register_load_state_pre_hook(load_hook))
