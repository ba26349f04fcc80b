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
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="the full provenance metadata (default: folded to one line)")
    parser.description = ("What a DTDR file or DTDR DCP checkpoint folder holds, from its index alone: sizes, "
                          "stored vs raw bytes and ratio per codec, the parity overhead (inner code included), "
                          "the metadata and the tensors.")


def parity_overhead(geometry: dict) -> float:
    """The parity bytes a full stripe adds per data byte: ``m`` parity chunks per ``k`` data chunks, plus the
    ``archive`` level's inner code (``P = nsym * ceil(chunk / (255 - nsym))`` bytes for each of the
    ``k + m`` chunks; docs/format.md section 1)."""
    k, m, chunk, nsym = geometry["k"], geometry["m"], geometry["chunk_size"], geometry.get("inner_nsym") or 0
    inner = nsym * -(-chunk // (255 - nsym)) if nsym else 0
    return (m * chunk + (k + m) * inner) / (k * chunk)


def _folder_infos(path: str, so) -> list[dict]:
    from ..api import info
    from ..kinds import DCP_METADATA_NAMES, DCP_SHARD_RE
    from ..storage import join, listdir

    names = [n for n in listdir(path, so) if DCP_SHARD_RE.fullmatch(n) or n in DCP_METADATA_NAMES]
    return [info(join(path, n), storage_options=so) for n in names]


def _fold(metadata: dict, verbose: bool, limit: int = 100) -> str:
    text = ", ".join(f"{k}={v}" for k, v in sorted(metadata.items()))
    text = " ".join(text.split())
    return text if verbose or len(text) <= limit else text[: limit - 3] + "..."


def run_info(args) -> int:
    from ..errors import FormatError
    from ..kinds import folder_kind
    from . import display

    so = options.storage_options(args.storage_option)
    kind = folder_kind(args.path, so)
    if kind is not None and kind != "dcp":
        raise FormatError(f"a {kind} folder, not a DTDR file or DTDR DCP checkpoint (convert it with dtdr convert)",
                          file=args.path)
    if kind == "dcp":
        infos = _folder_infos(args.path, so)
    else:
        from ..api import info

        infos = [info(args.path, storage_options=so)]
    if args.json:
        print(json.dumps(infos[0] if kind is None else {"folder": args.path, "files": infos}, indent=2))
        return 0
    if kind == "dcp":
        total = sum(d["file_size"] for d in infos)
        print(f"{args.path}: DTDR DCP checkpoint, {len(infos)} files, {display.size(total)}, "
              f"{sum(len(d['tensors']) for d in infos)} tensors")
    for d in infos:
        _print_file_info(d, args.verbose, display, indent="  " if kind == "dcp" else "")
    return 0


def _print_file_info(d: dict, verbose: bool, display, indent: str = "") -> None:
    g = d["geometry"]
    tensors = d["tensors"]
    print(f"{indent}{d['file']}: DTDR format {d['format_version']}, {display.size(d['file_size'])} "
          f"({d['file_size']} bytes), {len(tensors)} tensors")
    by_codec: dict[str, list[int]] = {}
    for t in tensors:
        sums = by_codec.setdefault(t["codec"], [0, 0, 0])
        sums[0] += 1
        sums[1] += t["stored_bytes"]
        sums[2] += t["raw_bytes"]
    stored = sum(v[1] for v in by_codec.values())
    raw = sum(v[2] for v in by_codec.values())
    overhead = parity_overhead(g)
    inner = f" + inner code {g['inner_nsym']} symbols per chunk" if g.get("inner_nsym") else ""
    print(f"{indent}  parity: {g['algorithm']} k={g['k']} m={g['m']}{inner}, chunk {display.size(g['chunk_size'])}: "
          f"overhead {100 * overhead:.2f} % of the data")
    print(f"{indent}  {'codec':<8}{'tensors':>8}{'stored':>12}{'raw':>12}{'ratio':>8}")
    for codec, (n, s_bytes, r_bytes) in sorted(by_codec.items()):
        print(f"{indent}  {codec:<8}{n:>8}{display.size(s_bytes):>12}{display.size(r_bytes):>12}"
              f"{(r_bytes / s_bytes if s_bytes else 0):>7.2f}x")
    print(f"{indent}  {'total':<8}{len(tensors):>8}{display.size(stored):>12}{display.size(raw):>12}"
          f"{(raw / stored if stored else 0):>7.2f}x   file {display.size(d['file_size'])}: "
          f"{display.percent(d['file_size'] - stored, stored)} over the stored tensor bytes (parity, index, padding)")
    if d["metadata"]:
        print(f"{indent}  metadata: {_fold(d['metadata'], verbose)}")
    w = max([len(t["name"]) for t in tensors] + [6])
    print(f"{indent}  {'tensor':<{w}}  {'dtype':<10}{'shape':<20}{'codec':<8}{'stored':>12}{'raw':>12}")
    for t in tensors:
        print(f"{indent}  {t['name']:<{w}}  {t['dtype']:<10}{str(t['shape']):<20}{t['codec']:<8}"
              f"{display.size(t['stored_bytes']):>12}{display.size(t['raw_bytes']):>12}")


def add_verify(parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="DTDR files or DTDR DCP checkpoint folders, local paths or fsspec URLs; local globs "
                             "(quoted or not) are expanded")
    options.add_storage_option(parser)
    parser.add_argument("--json", action="store_true",
                        help="machine-readable output: one report object for one PATH, an array for several")
    parser.add_argument("-v", "--verbose", action="store_true", help="the per-tensor table for clean files too")
    parser.add_argument("-j", "--jobs", type=options.positive_int, default=4, metavar="N",
                        help="files checked at the same time (default 4)")
    options.add_max_workers(parser)
    parser.epilog = ("A clean file prints one line: path, size, status, time, throughput. A damaged file prints its "
                     "per-tensor table (the wrong bytes that were restored, counted byte by byte; the bytes of checksum chunks that "
                     "could not be restored, counted in whole chunks) and the command that heals it. "
                     "Several paths end with a summary line; the exit status is the worst file's: 0 clean, "
                     "1 damaged but repairable exactly, 2 degraded or lost, 3 unreadable or missing.")


_STATUS_WORDS = {"exact": "clean", "repaired": "damaged, repairable exactly", "degraded": "DEGRADED",
                 "lost": "LOST"}


def heal_command(path: str, status: str, is_folder: bool) -> str | None:
    """The ``dtdr repair`` line that heals a file with ``status`` (None when nothing can)."""
    import shlex

    quoted = shlex.quote(path)
    if status == "exact":
        return None
    if is_folder:
        return "heal each damaged shard file listed above with: dtdr repair SHARD"
    if status == "repaired":
        return f"heal it with: dtdr repair {quoted}"
    stem = path[:-5] if path.endswith(".dtdr") else path
    if status == "degraded":
        return (f"write a copy with the degraded tensors marked: dtdr repair {quoted} -o "
                f"{shlex.quote(stem + '.repaired.dtdr')}")
    return (f"save what survives: dtdr repair {quoted} -o {shlex.quote(stem + '.salvaged.dtdr')} --salvage")


def _verify_one(path: str, so, max_workers, progress: bool = False):
    """``(report or None, error or None, size, seconds, is_folder)`` for one path; never raises
    a torch_dtdr or I/O error (it is returned)."""
    import time

    from ..dispatch import verify
    from ..errors import DTDRError
    from ..storage import isdir, total_size

    started = time.perf_counter()
    try:
        size = total_size(path, so)
        rep = verify(path, storage_options=so, progress=progress, max_workers=max_workers)
        return rep, None, size, time.perf_counter() - started, isdir(path, so)
    except (DTDRError, OSError) as e:
        return None, e, 0, time.perf_counter() - started, False


def run_verify(args) -> int:
    import time
    from concurrent.futures import ThreadPoolExecutor

    from . import display

    from .. import dispatch  # noqa: F401 - imported before the clock starts: the summary times the checks

    so = options.storage_options(args.storage_option)
    paths = display.expand_paths(args.paths)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(args.jobs, len(paths))) as pool:
        # one path: a bar of its bytes as they are checked; several: a bar of the files' bytes as each ends
        futures = [pool.submit(_verify_one, p, so, args.max_workers, len(paths) == 1 and not args.json)
                   for p in paths]
        bar = display.byte_bar(0, "verify", enabled=len(paths) > 1 and not args.json)
        results = []
        try:
            for future in futures:
                result = future.result()
                bar.total = (bar.total or 0) + result[2]
                bar.update(result[2])
                results.append(result)
        finally:
            bar.close()
    if len(paths) == 1 and results[0][1] is not None:
        raise results[0][1]  # one path: the usual one-line error
    statuses = []
    if args.json:
        objects = []
        for path, (rep, error, size, seconds, _) in zip(paths, results):
            if rep is None:
                objects.append({"file": path, "status": "lost", "unreadable": f"{type(error).__name__}: {error}",
                                "exit_code": 3})
                statuses.append(3)
                continue
            d = rep.to_dict()
            d.update(size=size, elapsed_s=round(seconds, 4), exit_code=rep.exit_code)
            objects.append(d)
            statuses.append(rep.exit_code)
        print(json.dumps(objects[0] if len(objects) == 1 else objects, indent=2))
        return max(statuses)
    width = max(len(p) for p in paths)
    word_width = max(len("UNREADABLE" if r[0].unreadable else _STATUS_WORDS[r[0].status]) for r in results
                     if r[0] is not None) if any(r[0] is not None for r in results) else 0
    total_bytes = 0
    for path, (rep, error, size, seconds, is_folder) in zip(paths, results):
        total_bytes += size
        if rep is None:
            print(f"{path:<{width}}  unreadable: {type(error).__name__}: {' '.join(str(error).split())}")
            statuses.append(3)
            continue
        statuses.append(rep.exit_code)
        word = "UNREADABLE" if rep.unreadable else _STATUS_WORDS[rep.status]
        print(f"{path:<{width}}  {display.size(size):>10}  {word:<{word_width}}  {seconds:>6.2f} s  {display.rate(size, seconds)}")
        if rep.unreadable and not args.verbose:
            print(f"  unreadable: {' '.join(str(rep.unreadable).split())}")
        elif not rep.clean or args.verbose:
            print("\n".join("  " + line for line in str(rep).splitlines()))
            heal = None if rep.unreadable else heal_command(path, rep.status, is_folder)
            if heal:
                print(f"  {heal}")
    if len(paths) > 1:
        elapsed = time.perf_counter() - started
        counts = {code: statuses.count(code) for code in range(4)}
        print(f"{len(paths)} paths, {display.size(total_bytes)} in {elapsed:.2f} s ({display.rate(total_bytes, elapsed)}): "
              f"{counts[0]} clean, {counts[1]} repairable, {counts[2]} degraded or lost, {counts[3]} unreadable")
    return max(statuses)


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

    from ..dispatch import verify

    so = options.storage_options(args.storage_option)
    # the output takes --output-storage-option, else the options of PATH
    out_so = options.storage_options(args.output_storage_option) if args.output_storage_option else so
    if args.output is None:
        # a clean file is left alone: not rewritten, its bytes and mtime unchanged
        found = verify(args.path, storage_options=so, progress=not args.json, max_workers=args.max_workers)
        if found.clean:
            if args.json:
                d = found.to_dict()
                d["written"] = None
                print(json.dumps(d, indent=2))
            else:
                print(f"{args.path} is clean: nothing to repair, file left unchanged")
            return 0
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
