"""The ``dtdr`` command: its parser, its one error path, and the table of subcommands.

Each command group lives in its own module (:mod:`.inspect`: info, verify,
repair; :mod:`.convert`: convert and its hidden alias dcp-convert;
:mod:`.faults`: corrupt, undo, sweep) as an ``add_<name>(parser)`` and a
``run_<name>(args) -> exit status`` pair; :data:`COMMANDS` lists them. A
subcommand's arguments are added only when it is used, and library modules
are imported only inside ``run_*``, so ``dtdr --help`` and ``dtdr --version``
import no torch. This package owns all argparse code of torch_dtdr; no
library module imports it.

Exit statuses: a command's own results as its help says (verify: 0 clean,
1 repaired, 2 degraded or lost, 3 unreadable); 2 for a usage error
(argparse); :data:`EXIT_FAILED` (3) when a command fails with a torch_dtdr
error or an I/O error (missing file, unreadable, refused);
:data:`EXIT_UNEXPECTED` (4) for any other exception (a bug: please report
it); 130 when interrupted. A failure prints one line, ``dtdr: <Type>:
<message>``, to stderr, with the traceback only under ``--debug``. A closed
pipe on stdout (``dtdr info f | head``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NamedTuple

from .options import storage_options

__all__ = ["main", "build_parser", "storage_options", "COMMANDS", "EXIT_FAILED", "EXIT_UNEXPECTED",
           "EXIT_INTERRUPTED"]

#: A command failed with a torch_dtdr error or an OSError (missing, unreadable, refused).
EXIT_FAILED = 3
#: A command failed with an exception torch_dtdr does not raise on purpose (a bug).
EXIT_UNEXPECTED = 4
#: Interrupted (Ctrl-C), as a shell reports SIGINT.
EXIT_INTERRUPTED = 130


class Command(NamedTuple):
    """One subcommand: ``add_<function>`` and ``run_<function>`` of ``cli.<module>``."""

    name: str
    module: str
    function: str
    help: str | None  # None: a hidden alias
    description: str | None = None


COMMANDS: tuple[Command, ...] = (
    Command("info", "inspect", "info", "tensors, codecs, sizes, parity, format version"),
    Command("verify", "inspect", "verify",
            "check every checksum (exit 0 clean, 1 repaired, 2 degraded/lost, 3 unreadable)"),
    Command("repair", "inspect", "repair",
            "write a healed file (exit 0 exact, 2 written with degraded/lost tensors marked, 3 refused or "
            "unreadable)"),
    Command("sweep", "faults", "sweep", "robustness sweep: damage each format at each fraction, load, compare",
            "Encode PATH (safetensors, .pt/.bin, .dtdr or a Hugging Face folder) in each format, replace each "
            "byte with probability f, load and compare with the original. Writes sweep.csv, summary.md and "
            "sweep.png to --out; resumes from a partial sweep.csv. Exit 4 if torch_dtdr raised an unexpected "
            "error in some run."),
    Command("corrupt", "faults", "corrupt", "damage a file deterministically (undo with `dtdr undo`)",
            "Damage PATH reproducibly (same seed, same file: same damage). Saves an undo record with --record."),
    Command("undo", "faults", "undo", "restore a file damaged by `dtdr corrupt` bit-exactly",
            "Restore the file a fault record names (sha256-checked)."),
    Command("convert", "convert", "convert",
            "convert safetensors / HF folders / torch .pt,.bin / DCP folders to DTDR, and DTDR back to "
            "safetensors or DCP"),
    Command("dcp-convert", "convert", "dcp_convert", None,
            "DCP checkpoint folder -> one DTDR file, or DTDR file -> DCP checkpoint (direction from PATH); "
            "an alias of `dtdr convert`."),
)


#: Commands after whose interruption no file has changed: they only read, or write one file atomically.
_NOTHING_WRITTEN_WHEN_INTERRUPTED = frozenset({"info", "verify", "repair"})


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser that adds its arguments on first use (parsing or
    help), so building the whole ``dtdr`` parser imports no library module."""

    def __init__(self, *args, command: Command | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._command = command

    def _populate(self) -> None:
        command, self._command = self._command, None
        if command is not None:
            module = importlib.import_module(f"{__name__}.{command.module}")
            getattr(module, f"add_{command.function}")(self)
            self.set_defaults(func=getattr(module, f"run_{command.function}"))

    def parse_known_args(self, args=None, namespace=None):
        self._populate()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._populate()
        return super().format_help()

    def format_usage(self) -> str:
        self._populate()
        return super().format_usage()


def _codec_core() -> str:
    """Which codec core a load would use, found without importing torch: the
    compiled extension is loaded from its file, outside the codecs package
    (whose import brings torch); see :func:`torch_dtdr.codecs.native.core`."""
    import importlib.machinery
    import importlib.util
    import os

    if os.environ.get("TORCH_DTDR_NATIVE", "").strip() == "0":
        return "reference"
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "codecs")
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(folder, "_native" + suffix)
        if not os.path.exists(path):
            continue
        try:
            spec = importlib.util.spec_from_file_location("torch_dtdr.codecs._native", path)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        except ImportError:
            continue
        return "native"
    return "reference"


def _version() -> str:
    from .. import __version__
    from ..format.constants import FORMAT_MAJOR, FORMAT_MINOR

    return f"torch-dtdr {__version__} (DTDR format {FORMAT_MAJOR}.{FORMAT_MINOR}, codec core: {_codec_core()})"


class _VersionAction(argparse.Action):
    """``--version``: the text is made when asked for, not at every parse."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "print the package, format and codec-core versions and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The ``dtdr`` parser with every subcommand of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="dtdr", description="Self-healing PyTorch checkpoints (DTDR).",
        epilog=f"A failed command prints 'dtdr: <Type>: <message>' and exits {EXIT_FAILED} (torch_dtdr or I/O "
               f"error) or {EXIT_UNEXPECTED} (unexpected error); usage errors exit 2, an interrupt "
               f"{EXIT_INTERRUPTED}.")
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    visible = [c.name for c in COMMANDS if c.help is not None]
    sub.metavar = "{" + ",".join(visible) + "}"
    for command in COMMANDS:
        kwargs = {"command": command, "description": command.description or command.help}
        if command.help is not None:
            kwargs["help"] = command.help
        sub.add_parser(command.name, **kwargs)
    return parser


def _quiet_stdout() -> None:
    """Point stdout at /dev/null after its reader went away, so the interpreter's
    last flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Run ``dtdr`` with ``argv`` (default: the process arguments) and return its exit status."""
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except KeyboardInterrupt:
        if args.debug:
            raise
        # these commands write nothing, or write only through an atomic temp file that is removed
        nothing_written = args.command in _NOTHING_WRITTEN_WHEN_INTERRUPTED
        print("dtdr: interrupted" + ("; nothing written" if nothing_written else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the one place a command's failure becomes an exit status
        if args.debug:
            raise
        from ..errors import DTDRError

        message = " ".join(str(e).split()) or "(no message)"
        print(f"dtdr: {type(e).__name__}: {message}", file=sys.stderr)
        return EXIT_FAILED if isinstance(e, (DTDRError, OSError)) else EXIT_UNEXPECTED
