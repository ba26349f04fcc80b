"""PyTorch Lightning: ``DTDRCheckpointIO`` writes the Trainer's checkpoints as
DTDR files (checksummed, parity-protected, committed atomically) and reads
them back, including on resume with ``ckpt_path``::

    from lightning.pytorch import Trainer
    from lightning.pytorch.plugins.io import AsyncCheckpointIO
    from torch_dtdr.integrations.lightning import DTDRCheckpointIO

    trainer = Trainer(plugins=[DTDRCheckpointIO(parity="strong")])       # or AsyncCheckpointIO(DTDRCheckpointIO())
    trainer.fit(model, ckpt_path="checkpoints/last.ckpt")

Loading also accepts checkpoints Lightning wrote with ``torch.save`` (as
:func:`torch_dtdr.load` does). Importing this module registers Lightning's
``AttributeDict`` (the type of ``hparams``) with :func:`torch_dtdr.register_type`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch.plugins.io import CheckpointIO

from .. import storage
from ..api import save
from ..registry import register_type
from ..shim import load

__all__ = ["DTDRCheckpointIO"]

register_type(AttributeDict, dict, AttributeDict, name="lightning.AttributeDict")


class DTDRCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that stores DTDR files.

    ``codec``, ``parity`` and ``save_kwargs`` go to :func:`torch_dtdr.save`;
    ``storage_options`` to fsspec for URLs (``s3://...``). ``errors`` is how
    damage is handled on load (``"strict"``: raise unless every tensor is
    bit-exact after parity repair; ``"recover"``: degrade gracefully and warn).
    """

    def __init__(self, *, codec="dtdr", parity="default", storage_options: Mapping | None = None,
                 errors: str = "strict", **save_kwargs):
        self.codec = codec
        self.parity = parity
        self.storage_options = dict(storage_options) if storage_options else None
        self.errors = errors
        self.save_kwargs = save_kwargs

    def _options(self, extra) -> dict | None:
        if extra is not None and not isinstance(extra, Mapping):
            raise TypeError(f"storage_options must be a mapping of fsspec options, got {type(extra).__name__}")
        merged = {**(self.storage_options or {}), **(extra or {})}
        return merged or None

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (creating its directory)."""
        options = self._options(storage_options)
        path = os.fspath(path)
        parent = path.rsplit("/", 1)[0] if "://" in path else os.path.dirname(path)
        if parent:
            storage.makedirs(parent, options)
        save(checkpoint, path, codec=self.codec, parity=self.parity, storage_options=options, **self.save_kwargs)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        """Read a checkpoint (DTDR, or a ``torch.save`` file with ``weights_only`` as given)."""
        path = os.fspath(path)
        if not storage.exists(path, self.storage_options):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load(path, map_location=map_location, weights_only=weights_only, errors=self.errors,
                    storage_options=self.storage_options)

    def remove_checkpoint(self, path) -> None:
        """Delete a checkpoint file (no error when it is already gone)."""
        storage.remove(os.fspath(path), self.storage_options, missing_ok=True)
