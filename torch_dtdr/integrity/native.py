"""Which inner Reed-Solomon decoder (and chunk-checksum loop) runs: the compiled one or the reference.

The compiled decoder (``torch_dtdr.integrity._rs``, built from ``_rs.c`` by the
package's setuptools build) decodes the inner code of the archive parity level
(:mod:`.inner`) one codeword at a time, without the GIL. The numpy batch
decoder in :mod:`.inner` is the reference and the fallback: both make the
same corrections and the same failure decisions (the test suite checks this).

``TORCH_DTDR_NATIVE=0`` in the environment forces the reference, as it does
for the codec core (:mod:`torch_dtdr.codecs.native`, a higher layer this
module cannot import); like there, it is read once, at first use. When the
compiled decoder is not installed (no C compiler at install time) the package
works with the reference and warns once, at first use.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings

__all__ = ["module", "core", "forced", "hashes_module"]

_lock = threading.Lock()
_loaded = False
_compiled = None
_override: str | None = None


def _load():
    global _loaded, _compiled
    with _lock:
        if _loaded:
            return _compiled
        if os.environ.get("TORCH_DTDR_NATIVE", "").strip() == "0":
            _compiled = None
        else:
            try:
                from . import _rs as compiled  # the extension module built from _rs.c
            except ImportError as exc:
                compiled = None
                warnings.warn(
                    f"torch-dtdr: the compiled Reed-Solomon decoder is not available ({exc}); using the slower "
                    "numpy reference for the archive level's inner code. Reinstall with a C compiler to build it.",
                    RuntimeWarning,
                    stacklevel=4,
                )
            _compiled = compiled
        _loaded = True
        return _compiled


_hashes_loaded = False
_hashes = None


def hashes_module():
    """The compiled chunk-checksum module (``_xxh``: xxh3_64 of every chunk of a
    buffer in one call without the GIL), or ``None``: then :mod:`.checksum`
    hashes chunk by chunk with the ``xxhash`` package (the same digests). Off
    with ``TORCH_DTDR_NATIVE=0`` and under :func:`forced` ``("reference")``;
    missing silently (the package path is only slower)."""
    global _hashes_loaded, _hashes
    if _override == "reference":
        return None
    if not _hashes_loaded:
        with _lock:
            if not _hashes_loaded:
                if os.environ.get("TORCH_DTDR_NATIVE", "").strip() != "0":
                    try:
                        from . import _xxh as compiled  # the extension module built from _xxh.c
                    except ImportError:
                        compiled = None
                    _hashes = compiled
                _hashes_loaded = True
    return _hashes


def module():
    """The compiled decoder's module, or ``None`` when the reference runs."""
    if _override == "reference":
        return None
    return _compiled if _loaded else _load()


def core() -> str:
    """``"native"`` (the compiled decoder) or ``"reference"`` (numpy)."""
    return "native" if module() is not None else "reference"


@contextlib.contextmanager
def forced(name: str):
    """Run the body with the reference decoder (``name="reference"``) or the
    default choice (``"default"``); process-wide, for tests and benchmarks."""
    global _override
    if name not in ("reference", "default"):
        raise ValueError(f"unknown decoder {name!r}")
    previous = _override
    _override = None if name == "default" else name
    try:
        yield
    finally:
        _override = previous
