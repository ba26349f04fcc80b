"""Argument types and shared flags of the ``dtdr`` command, written once for every command group.

``--storage-option KEY=VALUE`` parsing, the ``--parity`` level or ``K,M``
pair, positive counts, and the path / storage-option / ``--json`` arguments
most commands take. Imports no torch, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import json


def storage_options(pairs: list[str] | None) -> dict | None:
    """Parse repeated ``--storage-option key=value`` arguments (values as JSON when they parse)."""
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--storage-option expects key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def parity(text: str):
    """A ``--parity`` value: a level name (``default``, ``strong``, ``off``,
    ``archive``) as given, or ``K,M`` as a pair of ints (``(K, M)`` and ``[K, M]`` too)."""
    if "," not in text:
        return text
    k, _, m = text.strip().strip("()[]").partition(",")
    try:
        return int(k), int(m)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a level name or K,M with two integers, got {text!r}") from None


def positive_int(text: str) -> int:
    """An int of at least 1."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def add_storage_option(parser: argparse.ArgumentParser, flag: str = "--storage-option", what: str = "") -> None:
    """The repeatable ``--storage-option KEY=VALUE`` flag (or another name for it, such as
    ``--output-storage-option``)."""
    parser.add_argument(flag, action="append", metavar="KEY=VALUE",
                        help=what or "fsspec storage option (repeatable; values parsed as JSON when they can be)")


def add_common(parser: argparse.ArgumentParser, json_flag: bool = True) -> None:
    """``PATH``, ``--storage-option`` and (unless ``json_flag`` is false) ``--json``."""
    parser.add_argument("path", help="local path or fsspec URL")
    add_storage_option(parser)
    if json_flag:
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def add_max_workers(parser: argparse.ArgumentParser) -> None:
    """``--max-workers N``: concurrent range requests to a remote store."""
    parser.add_argument("--max-workers", type=positive_int, metavar="N",
                        help="concurrent range requests to a remote store (default 16)")


def add_encoding(parser: argparse.ArgumentParser) -> None:
    """``--codec``, ``--parity``, ``--block-size``: how a DTDR output is encoded."""
    parser.add_argument("--codec", default="dtdr", help="DTDR codec: dtdr (lossless, default), dtdr16, dtdr8, raw")
    parser.add_argument("--parity", type=parity, default="default",
                        help="parity level: default, strong, archive (adds an inner code per chunk), off, or K,M")
    parser.add_argument("--block-size", type=int, default=None, help="codec block size (default: the codec's)")
