"""Tree leaf kinds for standard-library values training loops keep in
checkpoints: ``pathlib`` paths and ``datetime`` values.

Each kind is a tagged JSON array of plain integers and strings (see the
schema in :mod:`torch_dtdr.tree`); decoding checks every field and builds the
value with the standard constructors only, so a hostile file can at worst be
rejected with :class:`~torch_dtdr.errors.FormatError`.
"""

from __future__ import annotations

import datetime
import pathlib

from .errors import FormatError

__all__ = ["LEAF_ENCODERS", "LEAF_TAGS", "decode_leaf"]

_PATH_FLAVOURS = {
    "PosixPath": pathlib.PosixPath,
    "WindowsPath": pathlib.WindowsPath,
    "PurePosixPath": pathlib.PurePosixPath,
    "PureWindowsPath": pathlib.PureWindowsPath,
}
# A concrete path of the other operating system's flavour cannot be built here.
_PURE_OF = {"PosixPath": pathlib.PurePosixPath, "WindowsPath": pathlib.PureWindowsPath}
_MAX_PATH_LEN = 1 << 16
_MAX_TZ_NAME = 64
_DAY_SECONDS = 86400


def _err(msg, where):
    return FormatError(f"malformed skeleton: {msg}", field=None if where is None else str(where))


def _enc_tz(tz, where):
    if tz is None:
        return None
    if type(tz) is not datetime.timezone:
        raise TypeError(f"unsupported tzinfo {type(tz).__name__} at {where}; only fixed-offset "
                        "datetime.timezone values are stored (convert with .astimezone(timezone.utc))")
    offset = tz.utcoffset(None)
    name = tz.tzname(None)
    plain = datetime.timezone(offset)
    keep_name = name if repr(tz) != repr(plain) else None
    return ["tz", offset.days * _DAY_SECONDS + offset.seconds, offset.microseconds, keep_name]


def _dec_tz(node, where):
    if node is None:
        return None
    if type(node) is not list or len(node) != 4 or node[0] != "tz":
        raise _err("tzinfo must be null or a ['tz', SECONDS, MICROSECONDS, NAME] node", where)
    _, seconds, micros, name = node
    if type(seconds) is not int or type(micros) is not int or not (-_DAY_SECONDS < seconds < _DAY_SECONDS):
        raise _err("bad timezone offset", where)
    if name is not None and (type(name) is not str or len(name) > _MAX_TZ_NAME):
        raise _err("bad timezone name", where)
    try:
        offset = datetime.timedelta(seconds=seconds, microseconds=micros)
        return datetime.timezone(offset) if name is None else datetime.timezone(offset, name)
    except (ValueError, TypeError, OverflowError) as e:
        raise _err(f"bad timezone ({e})", where) from None


def _ints(node, count, where, what):
    values = node[1:1 + count]
    if len(values) != count or any(type(v) is not int for v in values):
        raise _err(f"{what} needs {count} integers", where)
    return values


def _enc_path(x, where):
    text = str(x)
    if len(text) > _MAX_PATH_LEN:
        raise ValueError(f"path of {len(text)} characters at {where} is too long")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise TypeError(f"path at {where} is not valid UTF-8 text") from None
    return ["path", type(x).__name__, text]


def _enc_datetime(x, where):
    return ["datetime", x.year, x.month, x.day, x.hour, x.minute, x.second, x.microsecond, x.fold,
            _enc_tz(x.tzinfo, where)]


def _enc_time(x, where):
    return ["time", x.hour, x.minute, x.second, x.microsecond, x.fold, _enc_tz(x.tzinfo, where)]


#: type -> encoder(value, where-text) -> node
LEAF_ENCODERS = {
    pathlib.PosixPath: _enc_path,
    pathlib.WindowsPath: _enc_path,
    pathlib.PurePosixPath: _enc_path,
    pathlib.PureWindowsPath: _enc_path,
    datetime.datetime: _enc_datetime,
    datetime.date: lambda x, p: ["date", x.year, x.month, x.day],
    datetime.time: _enc_time,
    datetime.timedelta: lambda x, p: ["timedelta", x.days, x.seconds, x.microseconds],
}

LEAF_TAGS = frozenset(("path", "datetime", "date", "time", "timedelta"))


def decode_leaf(node, where):
    """The value of a ``path`` / ``datetime`` / ``date`` / ``time`` / ``timedelta`` node."""
    tag = node[0]
    try:
        if tag == "path":
            if len(node) != 3 or node[1] not in _PATH_FLAVOURS or type(node[2]) is not str:
                raise _err("path node must be ['path', FLAVOUR, TEXT]", where)
            if len(node[2]) > _MAX_PATH_LEN:
                raise _err("path text too long", where)
            cls = _PATH_FLAVOURS[node[1]]
            try:
                return cls(node[2])
            except NotImplementedError:  # WindowsPath on POSIX and the reverse
                return _PURE_OF[node[1]](node[2])
        if tag == "date":
            if len(node) != 4:
                raise _err("date node must be ['date', Y, M, D]", where)
            return datetime.date(*_ints(node, 3, where, "date"))
        if tag == "timedelta":
            if len(node) != 4:
                raise _err("timedelta node must be ['timedelta', DAYS, SECONDS, MICROSECONDS]", where)
            days, seconds, micros = _ints(node, 3, where, "timedelta")
            if not (0 <= seconds < _DAY_SECONDS and 0 <= micros < 1_000_000):
                raise _err("timedelta seconds/microseconds out of range", where)
            return datetime.timedelta(days=days, seconds=seconds, microseconds=micros)
        if tag == "datetime":
            if len(node) != 10:
                raise _err("datetime node must be ['datetime', Y, M, D, h, m, s, us, FOLD, TZ]", where)
            *fields, fold = _ints(node, 8, where, "datetime")
            if fold not in (0, 1):
                raise _err("fold must be 0 or 1", where)
            return datetime.datetime(*fields, fold=fold, tzinfo=_dec_tz(node[9], where))
        if tag == "time":
            if len(node) != 7:
                raise _err("time node must be ['time', h, m, s, us, FOLD, TZ]", where)
            *fields, fold = _ints(node, 5, where, "time")
            if fold not in (0, 1):
                raise _err("fold must be 0 or 1", where)
            return datetime.time(*fields, fold=fold, tzinfo=_dec_tz(node[6], where))
    except (ValueError, TypeError, OverflowError) as e:
        if isinstance(e, FormatError):
            raise
        raise _err(f"bad {tag} ({e})", where) from None
    raise _err(f"unknown tag {tag!r}", where)  # pragma: no cover - callers dispatch on LEAF_TAGS
