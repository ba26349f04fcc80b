"""Strict JSON parsing for untrusted files: no NaN/Infinity literals, no
duplicate member names (callers turn the ValueError into a FormatError)."""

from __future__ import annotations

import json


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


def canonical_dumps(obj) -> bytes:
    """The canonical UTF-8 JSON the format stores: compact, no NaN literals."""
    return json.dumps(obj, allow_nan=False, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
