"""torch_dtdr: self-healing PyTorch checkpoints.

DTDR (Distributed Transform-Domain Representation) stores each floating
tensor as blocks that went through a random-sign Hadamard transform and were
quantized in that domain, plus an exact residual, inside a checksummed,
parity-protected container. Damage is repaired bit-exactly where parity
allows and degrades into small bounded noise where it does not.

    import torch_dtdr
    torch_dtdr.save(state_dict, "model.dtdr")
    state_dict = torch_dtdr.load("model.dtdr")

The public names below are imported from their modules on first use (PEP
562; :func:`convert` is bound at once, as its module bears its name and
imports no torch), so ``import torch_dtdr`` (and the ``dtdr --help`` command) does not
import torch until a function that needs it is touched. See
docs/architecture.md for where each piece lives.
"""

from __future__ import annotations

import importlib

from . import errors
from .convert import convert  # bound now: the module of the same name must not shadow the function

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_PUBLIC = {
    "save": "api", "load": "api", "info": "api", "repair": "api",
    "verify": "dispatch",
    "patch": "shim", "unpatch": "shim",
    "open": "lazy",
    "load_model": "modules", "save_model": "modules",
    "Report": "report", "TensorReport": "report",
    "async_save": "checkpointing", "CheckpointManager": "manager",
    "register_type": "registry", "unregister_type": "registry", "unknown_types_as_dicts": "registry",
}

__all__ = ["save", "load", "open", "verify", "repair", "errors", "Report", "TensorReport", "__version__",
           "patch", "unpatch", "save_model", "load_model", "convert", "info",
           "register_type", "unregister_type", "unknown_types_as_dicts", "async_save",
           "CheckpointManager"]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
