"""``dtdr info``, ``dtdr verify`` and ``dtdr repair``: looking into a file or checkpoint and healing it.

Each ``add_*`` function adds one subcommand's arguments; each ``run_*``
function runs it and returns its exit status. Library modules are imported
inside the ``run_*`` functions, so ``dtdr --help`` imports no torch.
"""

from __future__ import annotations

import json
import sys

from . import options


def add_info(parser) -> None:
    options.add_common(parser)


def run_info(args) -> int:
    from ..api import info

    d = info(args.path, storage_options=options.storage_options(args.storage_option))
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


def add_verify(parser) -> None:
    options.add_common(parser)
    options.add_max_workers(parser)


def run_verify(args) -> int:
    from ..dispatch import verify

    rep = verify(args.path, storage_options=options.storage_options(args.storage_option), progress=not args.json,
                 max_workers=args.max_workers)
    print(rep.to_json(indent=2) if args.json else rep)
    return rep.exit_code


def add_repair(parser) -> None:
    options.add_common(parser)
    options.add_max_workers(parser)
    parser.add_argument("-o", "--output", help="destination (default: replace the file atomically)")
    options.add_storage_option(parser, "--output-storage-option",
                               "fsspec storage option for --output (repeatable; default: those of PATH)")
    parser.add_argument("--allow-degraded", action="store_true",
                        help="replace PATH in place even when some tensors cannot be restored exactly (they are "
                             "marked degraded in the new file; exit status 2)")
    parser.add_argument("--salvage", action="store_true",
                        help="write the surviving tensors of a file with lost tensors into a partial file (the lost "
                             "ones are listed, marked lost; exit status 2)")


def run_repair(args) -> int:
    from ..api import repair
    from ..errors import DTDRError

    so = options.storage_options(args.storage_option)
    # the output takes --output-storage-option, else the options of PATH
    out_so = options.storage_options(args.output_storage_option) if args.output_storage_option else so
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
            marked = [t.name for t in rep.tensors if t.status not in ("exact", "repaired")]
            print(f"file written to {args.output or args.path} with {len(marked)} tensors marked degraded or lost "
                  f"(verify and strict loads report them): {', '.join(marked[:10])}")
    # 0: every tensor restored exactly; 2: the output is marked degraded or partial
    return 0 if rep.exact else 2
