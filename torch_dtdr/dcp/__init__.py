"""DTDR storage for ``torch.distributed.checkpoint`` (DCP).

:class:`DTDRWriter` and :class:`DTDRReader` implement DCP's ``StorageWriter``
and ``StorageReader``, so a sharded, multi-rank checkpoint gets DTDR's
checksums, parity and codecs without a distributed layer of its own: DCP plans
who writes and reads what (deduplication, resharding), DTDR stores the bytes::

    import torch.distributed.checkpoint as dcp
    from torch_dtdr.dcp import DTDRReader, DTDRWriter

    dcp.save(state_dict, storage_writer=DTDRWriter("ckpt/step-1000"))
    dcp.load(state_dict, storage_reader=DTDRReader("ckpt/step-1000"))

Layout of a checkpoint folder (a local directory or an fsspec URL prefix)::

    __0_0.dtdr          rank 0's items: one DTDR container, one tensor per item
    __1_0.dtdr          rank 1's items
    ...
    metadata.dtdr       DCP's global metadata (see below), written last
    metadata.copy.dtdr  a second, independent copy of it

Each rank writes one container with :func:`torch_dtdr.save` (checksummed,
parity-protected, committed atomically). Tensor items use the chosen codec
(lossless ``"dtdr"`` by default); DCP's byte items (``BYTE_IO``: every
non-tensor value, which DCP serialises with ``torch.save``) are stored as
``uint8`` tensors with the ``raw`` codec, i.e. three voted copies plus parity.

The metadata is never pickled. DCP's ``Metadata`` is written field by field as
UTF-8 JSON (schema ``torch_dtdr.dcp`` version 1, below; ``planner_data`` goes
through :mod:`torch_dtdr.tree`'s pickle-free skeleton), stored as a ``uint8``
tensor inside a DTDR container whose string metadata carries the xxh3 of the
JSON, and written twice. The coordinator writes both copies in ``finish()``,
after every rank has committed its shard, each atomically; before any shard
is written it deletes the metadata of a checkpoint being overwritten. So a
folder without metadata is an interrupted save, and :class:`DTDRReader` refuses
it with :class:`IncompleteCheckpointError`. Every shard also records the id of
the save that wrote it, and the metadata records which id each file must
carry, so a shard left over from another save is never mixed in.

Metadata JSON (schema version 1)::

    {"format": "torch_dtdr.dcp", "version": 1,
     "dcp_version": STR | null,                  # Metadata.version
     "state_dict": [[FQN, ITEM], ...],           # Metadata.state_dict_metadata, in order
     "files": [[NAME, SAVE_ID], ...],            # shard files and the save that wrote them
     "storage": [[FQN, OFFSETS | null, INDEX | null, FILE_NO, KEY], ...],
                                                 # Metadata.storage_data: item -> file, key
     "planner_data": SKELETON,                   # torch_dtdr.tree skeleton (no tensors)
     "storage_meta": {"checkpoint_id": STR|null, "save_id": STR|null,
                      "load_id": STR|null, "modules": [STR, ...]} | null}
    ITEM = {"type": "bytes"}
         | {"type": "tensor", "dtype": NAME, "size": [INT, ...],
            "layout": NAME, "memory_format": NAME, "requires_grad": BOOL,
            "pin_memory": BOOL, "chunks": [[[OFFSET, ...], [SIZE, ...]], ...]}

Also here: :func:`verify_checkpoint` (per shard, per tensor), and the
converters :func:`dcp_to_dtdr` / :func:`dtdr_to_dcp` between a DCP checkpoint
and a single DTDR file (``dtdr convert IN OUT``).

The package: :mod:`.metadata` (the schema, its JSON form and its copies),
:mod:`.writer` and :mod:`.reader` (the two DCP classes), :mod:`.verify`,
:mod:`.convert`. Importing ``torch.distributed.checkpoint`` takes seconds,
so :mod:`.writer` and :mod:`.reader` are imported only when
:class:`DTDRWriter` or :class:`DTDRReader` is first used; nothing else here
needs it until a converter runs. A leaf: it imports the core, and the core
never imports it (:func:`torch_dtdr.verify` routes folders here from above).
"""

from __future__ import annotations

import importlib

from ..errors import IncompleteCheckpointError
from .convert import dcp_to_dtdr, dtdr_to_dcp
from .metadata import (FORMAT_NAME, FORMAT_VERSION, METADATA_COPY_NAME, METADATA_NAME, METADATA_NAMES,
                       SUPPORTED_TORCH, dcp_kind, is_checkpoint, read_metadata)
from .verify import CheckpointReport, verify_checkpoint

__all__ = [
    "DTDRWriter",
    "DTDRReader",
    "CheckpointReport",
    "IncompleteCheckpointError",
    "verify_checkpoint",
    "is_checkpoint",
    "dcp_kind",
    "read_metadata",
    "dcp_to_dtdr",
    "dtdr_to_dcp",
    "METADATA_NAME",
    "METADATA_COPY_NAME",
    "METADATA_NAMES",
    "SUPPORTED_TORCH",
    "FORMAT_NAME",
    "FORMAT_VERSION",
]

_LAZY = {"DTDRWriter": "writer", "DTDRReader": "reader"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
