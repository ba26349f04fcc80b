"""``dtdr corrupt``, ``dtdr undo`` and ``dtdr sweep``: deterministic damage, its undo, and robustness sweeps.

The command-line side of :mod:`torch_dtdr.faults` and
:mod:`torch_dtdr.sweep`: argument parsing and printing only. The ``add_*``
functions import the library module for its defaults and choices; they run
only when that subcommand is used, so ``dtdr --help`` imports neither.
"""

from __future__ import annotations

import json
import os
import re

from . import options


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _seeds(text: str):
    text = text.strip()
    if "," in text:
        return [int(x) for x in text.split(",") if x.strip()]
    return int(text)


def _regions(values: list[str] | None):
    if not values:
        return None
    out: list = []
    for v in values:
        m = re.fullmatch(r"(\d+)[:-](\d+)", v.strip())
        out.append((int(m.group(1)), int(m.group(2))) if m else v)
    return out[0] if len(out) == 1 else out


def add_sweep(parser) -> None:
    from ..sweep import DEFAULT_FORMATS, DEFAULT_FRACTIONS, FORMATS

    options.add_common(parser, json_flag=False)
    parser.add_argument("--fractions", default=",".join(repr(f) for f in DEFAULT_FRACTIONS),
                        help="comma-separated corruption fractions (default: %(default)s)")
    parser.add_argument("--seeds", default="5", help="number of seeds (0..n-1) or a comma-separated list (default: 5)")
    parser.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                        help=f"comma-separated formats (default: %(default)s; known: {', '.join(FORMATS)})")
    parser.add_argument("--out", required=True, help="output folder (local)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--keep-work", action="store_true", help="keep the encoded files in OUT/.sweep-work")
    parser.add_argument("--title", help="title of summary.md and the plot (default: from the checkpoint's name)")


def run_sweep(args) -> int:
    from ..sweep import sweep

    rows = sweep(args.path, fractions=_float_list(args.fractions), seeds=_seeds(args.seeds),
                 formats=[x.strip() for x in args.formats.split(",") if x.strip()], out=args.out,
                 workers=args.workers, progress=not args.no_progress,
                 storage_options=options.storage_options(args.storage_option), keep_work=args.keep_work,
                 title=args.title)
    errors = [r for r in rows if r.get("error")]
    print(f"{len(rows)} runs; results in {os.path.join(args.out, 'sweep.csv')}, "
          f"{os.path.join(args.out, 'summary.md')}, {os.path.join(args.out, 'sweep.png')}")
    if errors:
        print(f"dtdr: {len(errors)} run(s) hit a torch_dtdr bug (see the 'error' column), e.g. "
              f"{errors[0]['format']} f={errors[0]['fraction']} seed={errors[0]['seed']}: {errors[0]['error']}")
        return 4
    return 0


def add_corrupt(parser) -> None:
    from ..faults import MODES

    options.add_common(parser)
    parser.add_argument("--mode", required=True, choices=MODES)
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--fraction", type=float, help="probability that a byte (burst start, sector) is damaged")
    how.add_argument("--count", type=int,
                     help="exact number of damaged bytes (bursts, sectors; truncate: bytes removed)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--region", action="append",
                        help="restrict damage to START:END (half-open) or a DTDR part name/glob (repeatable)")
    parser.add_argument("--burst-length", type=int, default=64)
    parser.add_argument("--sector-size", type=int, default=4096)
    parser.add_argument("-o", "--output", help="write the damaged copy here and leave PATH untouched")
    parser.add_argument("--record", help="save the fault record (JSON) here, for `dtdr undo`")


def run_corrupt(args) -> int:
    from ..faults import corrupt

    rec = corrupt(args.path, mode=args.mode, fraction=args.fraction, count=args.count, seed=args.seed,
                  region=_regions(args.region), out=args.output,
                  storage_options=options.storage_options(args.storage_option),
                  burst_length=args.burst_length, sector_size=args.sector_size, record=args.record)
    if args.json:
        d = rec.to_dict()
        d.pop("changes")
        d.update({"n_bytes_changed": rec.n_bytes_changed, "n_runs": len(rec.changes), "record": args.record})
        print(json.dumps(d, indent=2))
    else:
        print(rec.summary())
        if args.record:
            print(f"record saved to {args.record} (undo with: dtdr undo {args.record})")
    return 0


def add_undo(parser) -> None:
    parser.add_argument("record", help="fault record JSON written by `dtdr corrupt --record`")
    parser.add_argument("--target", help="the damaged file (default: the one the record names)")
    options.add_storage_option(parser)


def run_undo(args) -> int:
    from ..errors import IntegrityError
    from ..faults import FaultRecord, is_restored, undo

    rec = FaultRecord.load(args.record)
    so = options.storage_options(args.storage_option)
    try:
        url = undo(rec, args.target, storage_options=so)
    except IntegrityError:
        if not is_restored(rec, args.target, storage_options=so):
            raise
        print(f"{args.target or rec.target} is already restored (sha256 {rec.original_sha256[:16]}, "
              f"{rec.original_size} bytes); nothing to do")
        return 0
    print(f"restored {url} (sha256 {rec.original_sha256[:16]}, {rec.original_size} bytes)")
    return 0
