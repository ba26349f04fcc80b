"""The ``dtdr`` command.

Core subcommands (info, verify, repair) live here; other modules contribute
theirs through a ``register_cli(subparsers, common)`` function, listed in
``_PLUGINS``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from .errors import DTDRError


#: Modules of this package that add subcommands (each defines ``register_cli``).
_PLUGINS: tuple[str, ...] = ("sweep", "dcp", "convert")


def storage_options(pairs: list[str] | None) -> dict | None:
    """Parse repeated ``--storage-option key=value`` arguments (values as JSON when they parse)."""
    return _storage_options(pairs)


def _storage_options(pairs: list[str] | None) -> dict | None:
    if not pairs:
        return None
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep:
            raise SystemExit(f"--storage-option expects key=value, got {p!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _cmd_info(args) -> int:
    from .api import info

    d = info(args.path, storage_options=_storage_options(args.storage_option))
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    g = d["geometry"]
    print(f"{d['file']}: DTDR format {d['format_version']}, {d['file_size']} bytes, {len(d['tensors'])} tensors")
    print(f"  parity: {g['algorithm']} k={g['k']} m={g['m']} chunk={g['chunk_size']} "
          f"(overhead {100 * g['m'] / g['k']:.2f}%)")
    if d["metadata"]:
        print(f"  metadata: {d['metadata']}")
    w = max([len(t["name"]) for t in d["tensors"]] + [6])
    print(f"  {'tensor':<{w}}  {'dtype':<10}{'shape':<20}{'codec':<8}{'stored':>12}{'raw':>12}")
    for t in d["tensors"]:
        print(f"  {t['name']:<{w}}  {t['dtype']:<10}{str(t['shape']):<20}{t['codec']:<8}{t['stored_bytes']:>12}{t['raw_bytes']:>12}")
    return 0


def _cmd_verify(args) -> int:
    from .dispatch import verify

    rep = verify(args.path, storage_options=_storage_options(args.storage_option), progress=not args.json,
                 max_workers=args.max_workers)
    print(rep.to_json(indent=2) if args.json else rep)
    return rep.exit_code


def _cmd_repair(args) -> int:
    from .api import repair

    so = _storage_options(args.storage_option)
    # the output takes --output-storage-option, else the options of PATH (as `dtdr dcp`)
    out_so = _storage_options(args.output_storage_option) if args.output_storage_option else so
    try:
        rep = repair(args.path, args.output, storage_options=so, out_storage_options=out_so, progress=not args.json,
                     max_workers=args.max_workers, allow_degraded=args.allow_degraded, salvage=args.salvage)
    except DTDRError as e:
        refused = getattr(e, "report", None)
        if refused is not None:
            print(refused.to_json(indent=2) if args.json else refused, file=sys.stdout)
        raise
    if args.json:
        print(rep.to_json(indent=2))
    else:
        print(rep.summary())
        if rep.exact:
            print(f"healed file written to {args.output or args.path}")
        else:
            marked = [t.name for t in rep.tensors if not t.status in ("exact", "repaired")]
            print(f"file written to {args.output or args.path} with {len(marked)} tensors marked degraded or lost "
                  f"(verify and strict loads report them): {', '.join(marked[:10])}")
    # 0: every tensor restored exactly; 2: the output is marked degraded or partial
    return 0 if rep.exact else 2


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _max_workers_flag(sp) -> None:
    sp.add_argument("--max-workers", type=_positive_int, metavar="N",
                    help="concurrent range requests to a remote store (default 16)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtdr", description="Self-healing PyTorch checkpoints (DTDR).")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, json_flag=True):
        sp.add_argument("path", help="local path or fsspec URL")
        sp.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                        help="fsspec storage option (repeatable; values parsed as JSON when they can be)")
        if json_flag:
            sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = sub.add_parser("info", help="tensors, codecs, sizes, parity, format version")
    common(sp)
    sp.set_defaults(func=_cmd_info)
    sp = sub.add_parser("verify", help="check every checksum (exit 0 clean, 1 repaired, 2 degraded/lost, 3 unreadable)")
    common(sp)
    _max_workers_flag(sp)
    sp.set_defaults(func=_cmd_verify)
    sp = sub.add_parser("repair", help="write a healed file (exit 0 exact, 2 written with degraded/lost tensors "
                                       "marked, 3 refused or unreadable)")
    common(sp)
    _max_workers_flag(sp)
    sp.add_argument("-o", "--output", help="destination (default: replace the file atomically)")
    sp.add_argument("--output-storage-option", action="append", metavar="KEY=VALUE",
                    help="fsspec storage option for --output (repeatable; default: those of PATH)")
    sp.add_argument("--allow-degraded", action="store_true",
                    help="replace PATH in place even when some tensors cannot be restored exactly (they are "
                         "marked degraded in the new file; exit status 2)")
    sp.add_argument("--salvage", action="store_true",
                    help="write the surviving tensors of a file with lost tensors into a partial file (the lost "
                         "ones are listed, marked lost; exit status 2)")
    sp.set_defaults(func=_cmd_repair)
    for name in _PLUGINS:
        importlib.import_module(f"{__package__}.{name}").register_cli(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FileNotFoundError as e:
        print(f"dtdr: {e}", file=sys.stderr)
        return 3
    except DTDRError as e:
        print(f"dtdr: {type(e).__name__}: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
