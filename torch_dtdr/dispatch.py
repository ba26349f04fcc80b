"""The front door that routes by what a path is: a DTDR file or a DCP checkpoint folder.

:func:`verify` is :func:`torch_dtdr.verify`: a DCP folder written by
:class:`torch_dtdr.dcp.DTDRWriter` goes to
:func:`torch_dtdr.dcp.verify_checkpoint`, anything else to
:func:`torch_dtdr.api.verify` (one file). It sits above both, so the core
(:mod:`torch_dtdr.api`) never imports its DCP plugin and :mod:`torch_dtdr.dcp`
stays a leaf that imports the core and nothing imports back.
"""

from __future__ import annotations

import os
from typing import Mapping

from . import api
from .decoding import check_workers
from .kinds import folder_kind
from .report import Report


def verify(f, *, storage_options: Mapping | None = None, progress: bool = False,
           max_workers: int | None = None, workers: int | None = None) -> Report:
    """Check every checksum of a DTDR file or of every file of a DTDR DCP
    checkpoint folder, and report (see :func:`torch_dtdr.api.verify` and
    :func:`torch_dtdr.dcp.verify_checkpoint`). Never raises for damage.
    ``workers`` threads decode segments, as in :func:`torch_dtdr.load`."""
    check_workers(workers)
    if isinstance(f, (str, os.PathLike)) and folder_kind(f, storage_options) == "dcp":
        from .dcp import verify_checkpoint

        return verify_checkpoint(f, storage_options=storage_options, progress=progress, max_workers=max_workers,
                                 workers=workers)
    return api.verify(f, storage_options=storage_options, progress=progress, max_workers=max_workers,
                      workers=workers)
