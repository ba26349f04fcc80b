"""The user types a program allows in a checkpoint: :func:`register_type`.

The pickle-free tree (:mod:`torch_dtdr.tree`) stores a registered type's
object as an ``["object", NAME, PLAIN]`` node: its name and the plain value
``to_plain`` made of it (anything the tree itself can store, tensors
included). Loading looks NAME up in *this process's* registry and calls the
``from_plain`` the loading program registered; nothing a file names is ever
imported or called otherwise. A name the loading program did not register is
an :class:`~torch_dtdr.errors.UnregisteredTypeError`, or, inside
:func:`unknown_types_as_dicts`, comes back as
``{"__dtdr_type__": NAME, "value": PLAIN}``.

Enums and dataclasses need no converters::

    torch_dtdr.register_type(Phase)                 # enum: stored by member name
    torch_dtdr.register_type(TrainConfig)           # dataclass: stored as its fields
    torch_dtdr.register_type(Fraction, lambda f: [f.numerator, f.denominator],
                             lambda p: Fraction(*p))
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import re
import threading
from typing import Any, Callable

__all__ = ["Registration", "register_type", "unregister_type", "registration_for_type",
           "registration_for_name", "unknown_types_as_dicts", "unknown_types_mode", "valid_type_name",
           "UNKNOWN_TYPE_KEY", "MAX_TYPE_NAME_LEN"]

MAX_TYPE_NAME_LEN = 256
#: The key naming the type in the plain dict an unregistered object becomes.
UNKNOWN_TYPE_KEY = "__dtdr_type__"
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.<>:\-]*")


@dataclasses.dataclass(frozen=True)
class Registration:
    """One registered type: its class, the name files carry, and the converters."""

    cls: type
    name: str
    to_plain: Callable[[Any], Any]
    from_plain: Callable[[Any], Any]


_lock = threading.Lock()
_by_type: dict[type, Registration] = {}
_by_name: dict[str, Registration] = {}
_unknown_mode: contextvars.ContextVar[str] = contextvars.ContextVar("torch_dtdr_unknown_types", default="error")


def valid_type_name(name) -> bool:
    """Whether ``name`` is a well-formed registered-type name (checked on save and load)."""
    return type(name) is str and 0 < len(name) <= MAX_TYPE_NAME_LEN and _NAME_RE.fullmatch(name) is not None


def _enum_converters(cls):
    if issubclass(cls, enum.Flag):  # composite flag values have no single member name
        def from_flag(value):
            return cls(value)
        return (lambda member: member.value), from_flag

    def from_name(name):
        if type(name) is not str or name not in cls.__members__:
            raise ValueError(f"{cls.__qualname__} has no member {name!r}")
        return cls[name]
    return (lambda member: member.name), from_name


def _dataclass_converters(cls):
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]

    def to_plain(obj):
        return {name: getattr(obj, name) for name in names}

    def from_plain(plain):
        if type(plain) is not dict or set(plain) != set(names):
            got = sorted(map(str, plain)) if isinstance(plain, dict) else type(plain).__name__
            raise ValueError(f"{cls.__qualname__} needs exactly the fields {names}, got {got}")
        obj = cls(**{f.name: plain[f.name] for f in fields if f.init})
        for f in fields:
            if not f.init:
                object.__setattr__(obj, f.name, plain[f.name])
        return obj
    return to_plain, from_plain


def register_type(cls: type, to_plain: Callable[[Any], Any] | None = None,
                  from_plain: Callable[[Any], Any] | None = None, *, name: str | None = None) -> type:
    """Allow objects of exactly ``cls`` (not its subclasses) in saved trees.

    ``to_plain(obj)`` returns something the tree stores natively (dicts, lists,
    numbers, strings, tensors, other registered objects...); ``from_plain``
    rebuilds the object from that when a file is loaded. Enum and dataclass
    types get default converters (member name; the fields as a dict), so
    ``register_type(MyEnum)`` is enough. ``name`` is what files carry
    (default ``"module.QualName"``); the loading program must register a type
    under the same name. Registering a class again replaces its converters.
    Returns ``cls``, so it also works as a class decorator.
    """
    if not isinstance(cls, type):
        raise TypeError(f"register_type expects a class, got {type(cls).__name__}")
    if cls.__module__ == "builtins":
        raise ValueError(f"{cls.__qualname__} is a builtin type; the tree stores the supported ones natively")
    if (to_plain is None) != (from_plain is None):
        raise TypeError("give both to_plain and from_plain, or neither (enums and dataclasses)")
    if to_plain is None:
        if issubclass(cls, enum.Enum):
            to_plain, from_plain = _enum_converters(cls)
        elif dataclasses.is_dataclass(cls):
            to_plain, from_plain = _dataclass_converters(cls)
        else:
            raise TypeError(f"{cls.__qualname__} is neither an enum nor a dataclass: give to_plain and from_plain")
    if not (callable(to_plain) and callable(from_plain)):
        raise TypeError("to_plain and from_plain must be callables")
    name = f"{cls.__module__}.{cls.__qualname__}" if name is None else name
    if not valid_type_name(name):
        raise ValueError(f"bad type name {name!r}: letters, digits, '_', '.', '<', '>', ':', '-'; "
                         f"at most {MAX_TYPE_NAME_LEN} characters")
    with _lock:
        other = _by_name.get(name)
        if other is not None and other.cls is not cls:
            raise ValueError(f"the name {name!r} is already registered for {other.cls!r}")
        old = _by_type.pop(cls, None)
        if old is not None:
            _by_name.pop(old.name, None)
        reg = Registration(cls, name, to_plain, from_plain)
        _by_type[cls] = reg
        _by_name[name] = reg
    return cls


def unregister_type(cls_or_name) -> None:
    """Forget a registration (by class or by name); no error when absent."""
    with _lock:
        reg = _by_name.get(cls_or_name) if isinstance(cls_or_name, str) else _by_type.get(cls_or_name)
        if reg is not None:
            _by_type.pop(reg.cls, None)
            _by_name.pop(reg.name, None)


def registration_for_type(cls: type) -> Registration | None:
    """The registration of exactly ``cls``, if any."""
    return _by_type.get(cls)


def registration_for_name(name: str) -> Registration | None:
    """The registration a loading program made under ``name``, if any."""
    return _by_name.get(name)


@contextlib.contextmanager
def unknown_types_as_dicts():
    """Inside this block, loading turns an object of a type this program did
    not register into ``{"__dtdr_type__": NAME, "value": PLAIN}`` instead of
    raising :class:`~torch_dtdr.errors.UnregisteredTypeError` (and a
    ``defaultdict`` whose factory is such a type into one without a factory).
    Applies to the current thread (or asyncio task)."""
    token = _unknown_mode.set("dict")
    try:
        yield
    finally:
        _unknown_mode.reset(token)


def unknown_types_mode() -> str:
    """``"error"`` (the default) or ``"dict"`` (inside :func:`unknown_types_as_dicts`)."""
    return _unknown_mode.get()
