"""``dtdr convert`` (and its hidden alias ``dtdr dcp-convert``): one implementation for every conversion.

safetensors files, Hugging Face folders and torch files to DTDR, DTDR back
to safetensors, and DCP checkpoint folders to one DTDR file or back, all
through :func:`torch_dtdr.convert.convert`. ``dcp-convert`` keeps its old
flags (``--to auto``: a folder becomes a DTDR file, a file a DCP
checkpoint) and runs the same code.
"""

from __future__ import annotations

import json

from . import options


def _add_shared(parser) -> None:
    parser.add_argument("output", help="destination: *.dtdr, *.safetensors, a folder (for safetensors), or a DCP "
                                       "checkpoint folder")
    options.add_encoding(parser)
    parser.add_argument("--errors", choices=("strict", "recover"), default="strict",
                        help="reading a DTDR source: refuse anything not bit-exact (strict, default) or convert "
                             "what can be recovered")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept a standard DCP checkpoint (pickled metadata) and non-tensor values that need "
                             "full unpickling; only for checkpoints you trust")
    options.add_storage_option(parser, "--output-storage-option",
                               "fsspec storage option for OUTPUT (repeatable; default: those of PATH)")


def add_convert(parser) -> None:
    options.add_common(parser)
    parser.add_argument("--to", choices=("dtdr", "safetensors", "dcp"), help="output format (default: inferred)")
    _add_shared(parser)


def add_dcp_convert(parser) -> None:
    options.add_common(parser, json_flag=False)
    parser.add_argument("--to", choices=("auto", "dtdr", "dcp"), default="auto",
                        help="output kind (default: a DTDR file when PATH is a folder, else a DCP checkpoint)")
    _add_shared(parser)
    parser.set_defaults(json=False)


def _lossy_codecs(path: str, so) -> list[str]:
    """The lossy codecs a DTDR file's tensors are stored with (empty for a lossless file or another kind)."""
    from ..api import info
    from ..codecs import get as codec_class
    from ..errors import DTDRError
    from ..kinds import kind_of

    if kind_of(path, so) != "dtdr":
        return []
    try:
        names = sorted({t["codec"] for t in info(path, storage_options=so)["tensors"]})
    except (DTDRError, OSError):
        return []  # the conversion itself reports an unreadable source
    lossy = []
    for name in names:
        try:
            if not getattr(codec_class(name), "lossless", True):
                lossy.append(name)
        except (DTDRError, KeyError, ValueError):
            continue
    return lossy


def run_convert(args) -> int:
    import sys
    import time

    from ..convert import convert
    from ..storage import total_size
    from . import display

    so = options.storage_options(args.storage_option)
    out_so = options.storage_options(args.output_storage_option) or so
    to = args.to
    if to == "auto":
        from ..storage import isdir

        to = "dtdr" if isdir(args.path, so) else "dcp"
    lossy = _lossy_codecs(args.path, so)
    lossless_target = to == "safetensors" or (to is None and args.output.endswith(".safetensors"))
    if lossy and lossless_target:
        print(f"dtdr: warning: {args.path} is stored with the lossy codec(s) {', '.join(lossy)}; the safetensors "
              "output holds their dequantised weights, not the original ones", file=sys.stderr)
    from ..kinds import folder_kind

    # bars of bytes (encoded, decoded) for every conversion; reading a DCP folder, the time it takes first
    reads_folder = folder_kind(args.path, so) in ("dcp", "torch-dcp")
    started = time.perf_counter()
    with display.spinner(f"convert {args.path}", enabled=not args.json and reads_folder):
        summary = convert(args.path, args.output, to=to, codec=args.codec, parity=args.parity,
                          block_size=args.block_size, errors=args.errors, storage_options=so,
                          out_storage_options=out_so, allow_pickle=args.allow_pickle, progress=not args.json)
    seconds = time.perf_counter() - started
    source_size = total_size(args.path, so)
    written = sum(total_size(f, out_so) for f in summary["files"])
    summary.update(source_size=source_size, written_size=written, seconds=round(seconds, 3))
    if summary["to"] in ("dtdr", "dcp"):
        summary.update(codec=args.codec, parity=args.parity if isinstance(args.parity, str) else list(args.parity))
    if lossy:
        summary["lossy_source_codecs"] = lossy
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    encoding = ""
    if summary["to"] in ("dtdr", "dcp"):
        parity = args.parity if isinstance(args.parity, str) else ",".join(map(str, args.parity))
        encoding = f", codec {args.codec}, parity {parity}"
    print(f"converted {args.path} ({summary['from']}, {display.size(source_size)}) -> {summary['to']}: "
          f"{', '.join(summary['files'])} ({display.size(written)}, {display.percent(written, source_size)} of the "
          f"source{encoding}) in {seconds:.1f} s")
    return 0


#: ``dtdr dcp-convert`` runs exactly what ``dtdr convert`` runs.
run_dcp_convert = run_convert
