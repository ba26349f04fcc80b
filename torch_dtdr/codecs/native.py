"""Which codec core runs: the compiled C core or the numpy/torch reference.

The compiled core (``torch_dtdr.codecs._native``, built from ``_native.c`` by the
package's setuptools build) runs the per-block hot paths of ``dtdr``, ``dtdr8``
and ``dtdr16`` on CPU buffers. The numpy/torch implementation in ``_blocks.py``
and ``_residual.py`` is the reference and the fallback: both cores write the same
bytes and decode to the same bits (the test suite checks this).

``TORCH_DTDR_NATIVE=0`` in the environment forces the reference core. When the
compiled core is not installed (no C compiler at install time) the package
works with the reference core and warns once, at first use.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings

__all__ = ["core", "module", "forced", "DTYPE_CODES"]

#: The dtype codes the compiled core understands, by torch dtype name.
DTYPE_CODES = {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3}

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
                from . import _native as compiled  # the extension module built from _native.c

                from ..errors import CodecError

                compiled.set_error_class(CodecError)
            except ImportError as exc:
                compiled = None
                warnings.warn(
                    f"torch-dtdr: the compiled codec core is not available ({exc}); using the slower "
                    "numpy/torch reference core. Reinstall with a C compiler to build it.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _compiled = compiled
        _loaded = True
        return _compiled


def module():
    """The compiled core's module, or ``None`` when the reference core runs."""
    if _override == "reference":
        return None
    return _compiled if _loaded else _load()  # (read without the lock once loaded: it never changes after)


def core() -> str:
    """``"native"`` (the compiled core) or ``"reference"`` (numpy/torch)."""
    return "native" if module() is not None else "reference"


@contextlib.contextmanager
def forced(name: str):
    """Run the body with the reference core (``name="reference"``) or the
    default choice (``"default"``); process-wide, for tests and benchmarks."""
    global _override
    if name not in ("reference", "default"):
        raise ValueError(f"unknown core {name!r}")
    previous = _override
    _override = None if name == "default" else name
    try:
        yield
    finally:
        _override = previous
