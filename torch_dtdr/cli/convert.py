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


def run_convert(args) -> int:
    from ..convert import convert

    so = options.storage_options(args.storage_option)
    out_so = options.storage_options(args.output_storage_option) or so
    to = args.to
    if to == "auto":
        from ..storage import isdir

        to = "dtdr" if isdir(args.path, so) else "dcp"
    summary = convert(args.path, args.output, to=to, codec=args.codec, parity=args.parity,
                      block_size=args.block_size, errors=args.errors, storage_options=so,
                      out_storage_options=out_so, allow_pickle=args.allow_pickle)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"converted {args.path} ({summary['from']}) -> {summary['to']}: " + ", ".join(summary["files"]))
    return 0


#: ``dtdr dcp-convert`` runs exactly what ``dtdr convert`` runs.
run_dcp_convert = run_convert
