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

from .errors import DamageWarning, IntegrityError, ObjectTypeError, warn_caller

__all__ = ["save_model", "load_model"]

#: The ``(missing_keys, unexpected_keys)`` named tuple ``load_state_dict`` returns.
_INCOMPATIBLE_KEYS = type(torch.nn.Module().load_state_dict({}, strict=False))


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

    From a DTDR file each tensor is decoded straight into the parameter's or
    buffer's own memory, a segment at a time, when it lives on the CPU with the
    stored dtype and shape; otherwise it is decoded on its own and copied in
    (a GPU parameter, another dtype), so memory stays near the model's size
    plus one tensor. Parameters on the ``meta`` device are replaced by the
    decoded tensors (``load_state_dict(..., assign=True)``), on ``device``.
    ``device`` is also where a torch file's tensors are decoded to.

    Returns ``(missing, unexpected)`` as ``module.load_state_dict(...,
    strict=False)`` does; with ``strict=True`` raises ``RuntimeError`` listing
    them, in ``load_state_dict``'s words (after loading what matches, as it
    does). Tied parameters count as loaded when the file holds any one of
    their names. ``errors`` and ``storage_options`` are those of
    :func:`torch_dtdr.load`.
    """
    from .shim import is_dtdr, load

    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"load_model expects an nn.Module, got {type(module).__name__}")
    if is_dtdr(f, storage_options):
        missing, unexpected, mismatched = _load_dtdr_in_place(module, f, device, errors, storage_options)
    else:
        state = load(f, map_location=device, errors=errors, storage_options=storage_options, weights_only=True)
        if not isinstance(state, Mapping):
            raise ObjectTypeError(f"the file holds a {type(state).__name__}, not a state dict", file=_file_name(f))
        state = dict(state)
        result = module.load_state_dict(state, strict=False)
        missing, unexpected, mismatched = list(result.missing_keys), list(result.unexpected_keys), []
        given = set(state)
        for group in _tied_groups(module.state_dict()):
            if group & given:
                missing = [k for k in missing if k not in group]
    if mismatched or (strict and (missing or unexpected)):
        error = f"Error(s) in loading state_dict for {module.__class__.__name__}:"
        if strict and unexpected:
            error += "\n\tUnexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in unexpected) + ". "
        if strict and missing:
            error += "\n\tMissing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in missing) + ". "
        for line in mismatched:
            error += "\n\t" + line
        raise RuntimeError(error)
    return _INCOMPATIBLE_KEYS(missing, unexpected)


def _load_dtdr_in_place(module: torch.nn.Module, f, device, errors, storage_options):
    """Decode a DTDR file's tensors into ``module``'s own tensors, one at a time."""
    from .lazy import open as open_lazy

    targets = module.state_dict(keep_vars=True)
    tied = _tied_groups(module.state_dict())
    assigned: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    filled: set[tuple] = set()
    lost: list[str] = []
    with open_lazy(f, errors=errors, storage_options=storage_options, warn_damage=False) as stored:
        if not stored.holds_mapping():
            raise ObjectTypeError("the file holds no state dict (its top-level object is not a mapping)",
                                  file=_file_name(f))
        names = stored.keys()
        given = set(names)
        for name, target in targets.items():
            if name not in given or not isinstance(target, torch.Tensor):
                continue
            if target.device.type == "meta":
                value = _fitting_value(stored, name, target, lost, mismatched)
                if value is not None:
                    assigned[name] = value.to(device=device, dtype=target.dtype)
                continue
            where = (target.untyped_storage().data_ptr(), target.storage_offset(), tuple(target.shape),
                     target.dtype)
            if where in filled:  # a tied parameter already loaded under another name
                continue
            try:
                done = stored.read_into(name, target)
            except IntegrityError:
                if errors == "strict":
                    raise
                lost.append(name)  # under errors="recover" only a lost tensor raises here
                continue
            if not done:
                value = _fitting_value(stored, name, target, lost, mismatched)
                if value is not None:
                    with torch.no_grad():
                        target.copy_(value)
                stored.release()
                if value is None:
                    continue
            filled.add(where)
        report = stored.report()
    if lost:
        raise IntegrityError(f"{len(lost)} tensor(s) are lost: " + ", ".join(repr(n) for n in lost),
                             file=_file_name(f), tensor=lost[0])
    if report.status != "exact":  # as torch_dtdr.load does: repaired or degraded data is said so
        warn_caller(DamageWarning(report.summary()))
    if assigned:
        module.load_state_dict(assigned, strict=False, assign=True)
    missing = [k for k in targets if k not in given]
    for group in tied:
        if group & given:
            missing = [k for k in missing if k not in group]
    unexpected = [k for k in names if k not in targets]
    return missing, unexpected, mismatched


def _fitting_value(stored, name: str, target: torch.Tensor, lost: list[str], mismatched: list[str]):
    """Tensor ``name`` decoded whole, when it can go into ``target``; else None, with ``name`` added
    to ``lost`` (nothing came back) or a line to ``mismatched`` (another shape)."""
    value = stored.get_tensor(name)
    if value is None:
        lost.append(name)
    elif tuple(value.shape) != tuple(target.shape):
        mismatched.append(_size_mismatch(name, value.shape, target.shape))
        value = None
    return value


def _size_mismatch(name, stored_shape, model_shape) -> str:
    return (f"size mismatch for {name}: copying a param with shape {torch.Size(stored_shape)} from checkpoint, "
            f"the shape in current model is {torch.Size(model_shape)}.")


def _file_name(f) -> str:
    return os.fspath(f) if isinstance(f, (str, os.PathLike)) else str(getattr(f, "name", f))
