"""``save_model`` / ``load_model``: whole ``nn.Module`` weights, in the shape of
``safetensors.torch.save_model`` / ``load_model``.

DTDR keeps shared storage, so tied parameters (an embedding reused as the
output projection) are stored once and written under every name; a file that
names only one of them (a Hugging Face checkpoint converted with
:func:`torch_dtdr.convert`, which omits tied copies) still loads with
``strict=True``, as with safetensors.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Mapping

import torch

__all__ = ["save_model", "load_model"]


def save_model(module: torch.nn.Module, f, **save_kwargs) -> None:
    """Save ``module.state_dict()`` to ``f`` (path, fsspec URL or binary file
    object). ``save_kwargs`` go to :func:`torch_dtdr.save` (``codec``,
    ``parity``, ``metadata``, ``storage_options``, ...). Tied parameters are
    stored once, under all their names."""
    from .api import save

    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"save_model expects an nn.Module, got {type(module).__name__}")
    save(dict(module.state_dict()), f, **save_kwargs)


def _tied_groups(state_dict: Mapping[str, torch.Tensor]) -> list[set[str]]:
    """Names of the module's state that are the same tensor (same storage, offset, shape, stride)."""
    groups: dict[tuple, set[str]] = defaultdict(set)
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # pragma: no cover - tensors without storage
            continue
        if ptr == 0:
            continue
        groups[(t.device, ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)].add(name)
    return [g for g in groups.values() if len(g) > 1]


def load_model(module: torch.nn.Module, f, strict: bool = True, device="cpu", *, errors: str = "recover",
               storage_options: Mapping | None = None):
    """Load weights saved by :func:`save_model` (or any DTDR file or torch
    state-dict file holding a flat ``{name: tensor}`` mapping) into ``module``.

    ``device`` is where the tensors are decoded to before being copied into
    the module (its ``map_location``). Returns ``(missing, unexpected)`` as
    ``module.load_state_dict(..., strict=False)`` does; with ``strict=True``
    raises ``RuntimeError`` listing them, in ``load_state_dict``'s words.
    Tied parameters count as loaded when the file holds any one of their names.
    ``errors`` and ``storage_options`` are those of :func:`torch_dtdr.load`.
    """
    from .shim import load

    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"load_model expects an nn.Module, got {type(module).__name__}")
    state = load(f, map_location=device, errors=errors, storage_options=storage_options, weights_only=True)
    if not isinstance(state, Mapping):
        from .errors import ObjectTypeError

        raise ObjectTypeError(f"the file holds a {type(state).__name__}, not a state dict",
                              file=os.fspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, "name", f))
    state = dict(state)
    tied = _tied_groups(module.state_dict())
    result = module.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    given = set(state)
    for group in tied:
        if group & given:
            missing = [k for k in missing if k not in group]
    if strict and (missing or unexpected):
        error = f"Error(s) in loading state_dict for {module.__class__.__name__}:"
        if unexpected:
            error += "\n\tUnexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in unexpected) + ". "
        if missing:
            error += "\n\tMissing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in missing) + ". "
        raise RuntimeError(error)
    return type(result)(missing, unexpected)
