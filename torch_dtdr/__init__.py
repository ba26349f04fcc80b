"""torch_dtdr: self-healing PyTorch checkpoints.

DTDR (Distributed Transform-Domain Representation) stores each floating
tensor as blocks that went through a random-sign Hadamard transform and were
quantized in that domain, plus an exact residual, inside a checksummed,
parity-protected container. Damage is repaired bit-exactly where parity
allows and degrades into small bounded noise where it does not.

    import torch_dtdr
    torch_dtdr.save(state_dict, "model.dtdr")
    state_dict = torch_dtdr.load("model.dtdr")
"""

from . import errors
from .api import info, repair, save
from .dispatch import verify
from .convert import convert
from .lazy import open
from .modules import load_model, save_model
from .shim import load, patch, unpatch
from .report import Report, TensorReport

__version__ = "0.1.0"

__all__ = ["save", "load", "open", "verify", "repair", "errors", "Report", "TensorReport", "__version__",
           "patch", "unpatch", "save_model", "load_model", "convert", "info"]
