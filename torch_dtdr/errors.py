"""Typed errors and warnings raised by torch_dtdr.

Every error is a :class:`DTDRError` and also subclasses the builtin a caller
would naturally catch (a malformed file is a ``ValueError``, a missing one a
``FileNotFoundError``). Errors about stored data carry the file, the tensor and
the byte range involved, so a message alone is enough to locate the damage.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

__all__ = [
    "DTDRError",
    "FormatError",
    "UnsupportedVersionError",
    "UnregisteredTypeError",
    "IntegrityError",
    "TruncatedError",
    "CheckpointNotFoundError",
    "IncompleteCheckpointError",
    "NoIntactCheckpointError",
    "ArgumentError",
    "ObjectTypeError",
    "CodecError",
    "DeviceError",
    "StorageError",
    "DTDRWarning",
    "DamageWarning",
    "CheckpointFallbackWarning",
    "warn_caller",
]


def _describe(file=None, tensor=None, byte_range=None, field=None) -> str:
    parts = []
    if file is not None:
        parts.append(f"file={file!s}")
    if tensor is not None:
        parts.append(f"tensor={tensor!r}")
    if byte_range is not None:
        start, end = byte_range
        parts.append(f"bytes=[{start}, {end})")
    if field is not None:
        parts.append(f"field={field}")
    return (" (" + ", ".join(parts) + ")") if parts else ""


class DTDRError(Exception):
    """Base class of every error torch_dtdr raises on purpose.

    ``file``, ``tensor``, ``byte_range`` and ``field`` locate the problem; any of
    them may be ``None`` when it does not apply.
    """

    def __init__(self, message: str, *, file=None, tensor=None, byte_range=None, field=None):
        self.message = message
        self.file = None if file is None else str(file)
        self.tensor = tensor
        self.byte_range = None if byte_range is None else (int(byte_range[0]), int(byte_range[1]))
        self.field = field
        super().__init__(message + _describe(self.file, tensor, self.byte_range, field))

    def __reduce__(self):  # keep errors picklable for multiprocessing users
        return (_rebuild, (type(self), self.message, self.file, self.tensor, self.byte_range, self.field))


def _rebuild(cls, message, file, tensor, byte_range, field):
    return cls(message, file=file, tensor=tensor, byte_range=byte_range, field=field)


class FormatError(DTDRError, ValueError):
    """The bytes are not a valid DTDR container (bad magic, malformed index, a
    field out of range, a limit exceeded)."""


class UnsupportedVersionError(FormatError):
    """The file was written by a newer, incompatible major format version."""


class UnregisteredTypeError(FormatError):
    """The file holds an object of a type the loading program has not
    registered with :func:`torch_dtdr.register_type` (nothing a file names is
    ever imported); register it, or load inside
    :func:`torch_dtdr.unknown_types_as_dicts` to get plain dicts."""


class IntegrityError(DTDRError, IOError):
    """Stored data failed its checksums and could not be restored bit-exactly
    (raised by ``errors="strict"``)."""


class TruncatedError(IntegrityError):
    """The file ends early: an interrupted write, copy or upload."""


class CheckpointNotFoundError(DTDRError, FileNotFoundError):
    """The path or URL names no file."""


class IncompleteCheckpointError(CheckpointNotFoundError):
    """A distributed checkpoint folder holds no committed metadata: the save
    that wrote it was interrupted (or it is not a DTDR DCP checkpoint)."""


class NoIntactCheckpointError(CheckpointNotFoundError):
    """No step of a :class:`~torch_dtdr.CheckpointManager` directory loads
    exactly; ``problems`` maps each step to what was wrong with it."""

    def __init__(self, message: str, *, problems=None, **kwargs):
        super().__init__(message, **kwargs)
        self.problems = dict(problems or {})


class ArgumentError(DTDRError, ValueError):
    """Arguments that cannot describe the requested operation (e.g. fault
    injection asked for both a fraction and a count)."""


class ObjectTypeError(DTDRError, TypeError):
    """A valid file holds an object of a kind the operation cannot take (a list
    where a ``{name: tensor}`` state dict is needed, say)."""


class CodecError(DTDRError, ValueError):
    """An unknown codec, or codec parameters that cannot apply to a tensor."""


class DeviceError(DTDRError, RuntimeError):
    """A tensor cannot be placed on the device it was saved from (or that
    ``map_location`` names): an unknown device string, or one this machine
    lacks. Pass ``map_location`` to load elsewhere."""


class StorageError(DTDRError, OSError):
    """The storage back-end failed (a write could not be committed, a range
    read came back short)."""


class DTDRWarning(UserWarning):
    """Base class of torch_dtdr's warnings."""


class CheckpointFallbackWarning(DTDRWarning):
    """:meth:`torch_dtdr.CheckpointManager.restore` skipped a damaged, torn or
    uncommitted step and fell back to an older one."""


class DamageWarning(DTDRWarning):
    """A load returned data that was repaired, degraded or lost; the warning's
    text summarises the report."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# frames a call into torch_dtdr may pass through between the user's line and ours
_PASS_THROUGH = (_PACKAGE_DIR, os.path.abspath(contextlib.__file__))


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by the function calling
    this one point at the first frame outside the torch_dtdr package: the
    user's line. Counted by walking the stack (rather than fixed per call
    site) so it stays right however deep the call goes inside the package."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PASS_THROUGH):
        frame = frame.f_back
        level += 1
    return level if frame is not None else 2


def warn_caller(warning: Warning) -> None:
    """Issue ``warning`` at the caller's line (see :func:`caller_stacklevel`)."""
    warnings.warn(warning, stacklevel=caller_stacklevel())
