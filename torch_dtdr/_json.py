"""Strict JSON parsing for untrusted files: no NaN/Infinity literals, no
duplicate member names (callers turn the ValueError into a FormatError).
And :func:`cycle_collection_paused`, for turning a large JSON document into
objects without the cycle collector scanning it half-built."""

from __future__ import annotations

import contextlib
import gc
import json
import threading


def _no_constants(name):
    raise ValueError(f"JSON constant {name} is not allowed")


def _no_duplicates(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate member name in a JSON object")
    return d


def strict_loads(text):
    """``json.loads`` that refuses NaN/Infinity and duplicate member names."""
    return json.loads(text, parse_constant=_no_constants, object_pairs_hook=_no_duplicates)


#: One encoder for every call: ``json.dumps`` with options builds a new one each time, which costs a
#: small document (a tensor's entry in the index) more than its encoding. Encoders keep no state.
_CANONICAL = json.JSONEncoder(allow_nan=False, separators=(",", ":"), ensure_ascii=False)


def _c_canonical():
    """json's C encoder with :data:`_CANONICAL`'s options, built once (``JSONEncoder.encode`` builds
    it again on every call), or None where json has no C accelerator. It skips the check for
    circular references: the format's documents are trees this package builds."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    try:
        encode = make(None, _CANONICAL.default, json.encoder.encode_basestring, None, ":", ",", False, False, False)
        sample = {"a": [1, 2.5, None, True, "\u00e9\n"]}
        if "".join(encode(sample, 0)) != _CANONICAL.encode(sample):
            return None
    except Exception:  # another Python's signature: use the portable path
        return None
    return encode


_C_CANONICAL = _c_canonical()


def canonical_dumps(obj) -> bytes:
    """The canonical UTF-8 JSON the format stores: compact, no NaN literals."""
    if _C_CANONICAL is not None:
        return "".join(_C_CANONICAL(obj, 0)).encode("utf-8")
    return _CANONICAL.encode(obj).encode("utf-8")


_pause_lock = threading.Lock()
_pause_depth = 0
_pause_restores = False


@contextlib.contextmanager
def cycle_collection_paused():
    """Run the body with Python's cycle collector off (restored after, also on an exception).

    Parsing an index allocates thousands of lists and dicts that all live until
    the parse ends (and most die then). With the collector on, they set off
    young collections that move them into the oldest generation, and every few
    loads a full collection walks every object of the process: MiniLM x4 loads
    spent 9 ms a load there on average, 3 ms with parsing paused. Nothing
    parsed here holds a reference cycle, so the pause loses nothing (Mercurial
    pauses the collector the same way while it builds large structures).
    Nested and concurrent pauses (loads on several threads) are counted: the
    collector comes back when the last one ends, and only if it was on before
    the first one began."""
    global _pause_depth, _pause_restores
    with _pause_lock:
        if _pause_depth == 0:
            _pause_restores = gc.isenabled()
            gc.disable()
        _pause_depth += 1
    try:
        yield
    finally:
        with _pause_lock:
            _pause_depth -= 1
            if _pause_depth == 0 and _pause_restores:
                gc.enable()
