"""Pickle-free encoding of nested Python objects that hold tensors.

:func:`flatten` splits an object (a ``state_dict``, an optimizer state, a whole
training checkpoint) into a JSON-serialisable *skeleton* and a list of
:class:`TensorEntry` -- the tensor data to store. :func:`unflatten` rebuilds the
object from the skeleton and the loaded entries. Nothing is ever imported or
called by name: every node is one of a fixed set of tags, so a hostile file
can at worst be rejected with :class:`~torch_dtdr.errors.FormatError`.

Skeleton schema (tree version 1)
================================

The container stores the skeleton as UTF-8 JSON written with
``json.dumps(skeleton, allow_nan=False, separators=(",", ":"), ensure_ascii=False)``
(see :func:`skeleton_to_json` / :func:`skeleton_from_json`). The skeleton is a
JSON object with exactly these members::

    {"format":  "torch_dtdr.tree",
     "version": 1,
     "root":    NODE,               # the saved object
     "tensors": [TENSOR, ...],      # one per distinct tensor / ndarray object
     "entries": [ENTRY, ...]}       # one per stored tensor ("storage unit")

NODE is one of (a reader rejects anything else)::

    null | true | false             None, True, False
    JSON integer (no '.', no 'e')   int     (writers use it for |n| <= 2**53)
    JSON number with '.' or 'e'     float   (finite; exact: written with repr())
    JSON string                     str     (only when encodable as UTF-8)
    ["list",  NODE, ...]            list
    ["tuple", NODE, ...]            tuple
    ["dict",  KEY, NODE, KEY, NODE, ...]   dict, keys and values alternate, in order
    ["odict", KEY, NODE, ...]       collections.OrderedDict, same layout
    ["int", TEXT]                   int; TEXT is "-"? then decimal digits
                                    ("0" or no leading zero, at most 4000 digits),
                                    or "-"? "0x" lowercase hex digits (used past
                                    13000 bits)
    ["float", "nan"|"inf"|"-inf"]   non-finite float (NaN payload and sign are not kept)
    ["complex", REAL, IMAG]         complex; REAL/IMAG are a JSON number or a "float" node
    ["str", B64]                    str that is not valid UTF-8 (lone surrogates);
                                    B64 = base64 of str.encode("utf-8", "surrogatepass")
    ["bytes", B64]                  bytes        (standard base64 with padding)
    ["bytearray", B64]              bytearray
    ["dtype", NAME]                 torch.dtype; NAME = str(dtype) without "torch."
                                    ("float32", "float8_e4m3fn", "uint64", ...)
    ["device", TEXT]                torch.device(TEXT), TEXT = str(device) ("cuda:1", "meta")
    ["size", INT, ...]              torch.Size of JSON integers
    ["tensor", I]                   the object described by tensors[I]; two nodes
                                    naming the same I are the same Python object
    ["npscalar", NPDTYPE, NODE]     numpy scalar, e.g. ["npscalar","float32",0.5];
                                    NODE is bool / int / float / complex to match

Added later in version 1 (files using them need a reader that knows them;
files without them are unchanged)::

    ["set", NODE, ...]              set; elements must be hashable and distinct
    ["frozenset", NODE, ...]        frozenset, same rules
    ["namespace", KEY, NODE, ...]   argparse.Namespace; KEYs are attribute names
                                    (JSON strings), laid out as in "dict"
    ["defaultdict", FACTORY, KEY, NODE, ...]
                                    collections.defaultdict; FACTORY is null (no
                                    factory), one of "list" "dict" "set"
                                    "frozenset" "tuple" "int" "float" "complex"
                                    "str" "bytes" "bool" "odict", or
                                    ["type", TYPENAME] (a registered type)
    ["path", FLAVOUR, TEXT]         pathlib path; FLAVOUR is "PosixPath",
                                    "WindowsPath", "PurePosixPath" or
                                    "PureWindowsPath" (a concrete path of the other
                                    OS's flavour loads as its Pure variant)
    ["date", Y, M, D]               datetime.date
    ["time", h, m, s, us, FOLD, TZ] datetime.time
    ["datetime", Y, M, D, h, m, s, us, FOLD, TZ]
                                    datetime.datetime; all fields JSON integers,
                                    FOLD 0 or 1; TZ is null or
                                    ["tz", SECONDS, MICROSECONDS, NAME] (a fixed
                                    offset datetime.timezone; NAME null or its
                                    explicit name)
    ["timedelta", DAYS, SECONDS, MICROSECONDS]
                                    datetime.timedelta in its normalised fields
    ["object", TYPENAME, NODE]      an object of a type registered with
                                    torch_dtdr.register_type: NODE is the plain
                                    value its to_plain returned (enum: member
                                    name, or value for enum.Flag; dataclass: a
                                    "dict" of its fields)

TYPENAME matches ``[A-Za-z_][A-Za-z0-9_.<>:-]*`` (at most 256 characters). A
reader looks it up in the registry of the program that loads and calls only
the ``from_plain`` that program registered; it never imports or calls
anything by the name in the file. An unregistered TYPENAME is an
``UnregisteredTypeError`` (a FormatError), or inside
``torch_dtdr.unknown_types_as_dicts()`` a plain
``{"__dtdr_type__": TYPENAME, "value": PLAIN}`` dict (a defaultdict's
unregistered factory becomes null). Validation checks the form only.

KEY (dict keys) is restricted to: null, true, false, a JSON integer, a JSON
number, a JSON string, or an "int", "float" or "str" node. Duplicate keys (as
Python compares them) are malformed. Containers nest at most ``MAX_DEPTH``
levels (the root container is level 1); a skeleton holds at most ``MAX_NODES``
nodes; a string or base64 text is at most ``MAX_STR_LEN`` characters.

TENSOR (one per distinct tensor object, in order of first appearance)::

    {"entry":  E,              # index into "entries"
     "dtype":  NAME,           # the tensor's dtype
     "offset": INT,            # first element, in elements of "dtype", counted from
                               #   the first byte of entry E
     "shape":  [INT, ...],     # sizes (>= 0), at most MAX_NDIM of them
     "stride": [INT, ...],     # strides in elements (>= 0), same length as shape
     "device": TEXT,           # str() of the original device ("cpu", "cuda:1"; matches
                               #   [a-z_][a-z0-9_]*(:[0-9]+)?); informational: the
                               #   loader decides where data goes (map_location)
     "requires_grad": BOOL,    # only true for floating point / complex dtypes
     "kind":   "tensor" | "parameter" | "ndarray",
     "np_dtype": NPDTYPE}      # only (and always) when kind is "ndarray"

The tensor is ``as_strided`` over entry E's bytes: element ``(i0, i1, ...)`` is at
byte ``(offset + sum(ik * stride[k])) * itemsize``. Its dtype equals entry E's
dtype, except that an entry of dtype ``uint8`` (raw bytes) may be viewed as any
dtype. When it has elements, ``(offset + sum((shape[k]-1)*stride[k]) + 1) *
itemsize`` must not exceed entry E's byte size; ``offset * itemsize`` never may.
Several records naming one entry share memory after loading. "parameter"
comes back as ``torch.nn.Parameter``; "ndarray" as ``numpy.ndarray`` of NPDTYPE
(one of bool, int8..int64, uint8..uint64, float16/32/64, complex64/128; the
torch dtype is the same-named one, native byte order).

ENTRY (one stored tensor; ``entries[i]`` is the i-th :class:`TensorEntry`)::

    {"name": TEXT,             # unique, at most MAX_NAME_LEN characters
     "dtype": NAME,            # stored dtype (no quantized / sub-byte intN, uintN)
     "shape": [INT, ...]}      # stored shape; its data is numel elements, C order

How tensors become entries (writer side): tensors are grouped by the storage
they view (device, storage data pointer, storage size); in each group, tensors
whose byte ranges overlap form one *unit* and every unit is one entry. A unit
of one tensor stores just that tensor's elements (contiguous: as-is with its
shape; non-contiguous: the 1-D span it covers when that is no larger than its
element count, keeping its strides, else a contiguous copy), never the rest of
the buffer. A unit of several same-dtype tensors stores the 1-D span from the
lowest to the highest element any of them reaches. A unit mixing dtypes
stores that span as ``uint8`` bytes, its start rounded down to the largest
itemsize so every member stays aligned. Entries are ordered by the first
appearance of any of their tensors; names come from the path of that first
appearance (``"model.layer1.weight"``, ``"optim.state.0.exp_avg"``; a root tensor
is ``"<root>"``), made unique by appending ``"#2"``, ``"#3"``, ...

Not preserved: the identity of containers that appear in several places (each
occurrence is written out), NaN payloads, numpy byte order, tensor ``.grad``.
Unsupported (``TypeError`` naming the path): unregistered classes (enums and
dataclasses included), defaultdicts whose factory is not a builtin or
registered type, tzinfo other than ``datetime.timezone``, subclasses of the
built-in containers and scalars, tensor subclasses other than ``nn.Parameter``, sparse /
quantized / nested / named / meta tensors, object or string ndarrays, and any
other type. A container that contains itself raises ``ValueError``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import math
import re
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import registry, tree_stdlib
from ._json import canonical_dumps, strict_loads
from .dtypes import ALL_DTYPES
from .errors import FormatError, UnregisteredTypeError, UnsupportedVersionError

try:  # numpy is a dependency, but keep the module importable without it
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

__all__ = [
    "TensorEntry",
    "flatten",
    "unflatten",
    "tensor_paths",
    "tensor_refs",
    "entry_devices",
    "Builder",
    "validate",
    "skeleton_to_json",
    "skeleton_from_json",
    "FORMAT_NAME",
    "TREE_VERSION",
    "MAX_DEPTH",
    "MAX_NODES",
    "MAX_STR_LEN",
    "MAX_NAME_LEN",
    "MAX_NDIM",
]

FORMAT_NAME = "torch_dtdr.tree"
TREE_VERSION = 1

# Containers nest at most this deep. Each level is one level of JSON arrays, and
# CPython's json module recurses once per level (RecursionError near 1000 on
# 3.11), so 500 leaves room for the caller's own stack.
MAX_DEPTH = 500
MAX_NODES = 10_000_000
MAX_STR_LEN = 1 << 26  # characters in one str, or in one base64 text
MAX_NAME_LEN = 1024
MAX_NDIM = 64
MAX_DECIMAL_DIGITS = 4000
MAX_DEVICE_LEN = 64
_MAX_INDEX = 1 << 62  # bound for offsets, strides, sizes, byte counts
_SAFE_INT = 1 << 53
_DECIMAL_BITS = 13000  # ints up to this many bits are written in decimal
_ROOT_NAME = "<root>"

_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_DEC_RE = re.compile(r"-?(?:0|[1-9][0-9]*)")
_HEX_RE = re.compile(r"-?0x[0-9a-f]+")
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")
_DEVICE_RE = re.compile(r"[a-z_][a-z0-9_]*(?::[0-9]{1,9})?")

# Every torch.dtype by canonical name ("float32", not "float").
_ALL_DTYPES: dict[str, torch.dtype] = ALL_DTYPES
# Dtypes a tensor may be stored as: quantized and sub-byte (u)int1..7 tensors
# cannot even be copied.
_STORABLE: dict[str, torch.dtype] = {
    n: d
    for n, d in _ALL_DTYPES.items()
    if not n.startswith("q") and not re.fullmatch(r"u?int[1-7]", n)
}
_STORABLE_DTYPES = frozenset(_STORABLE.values())
_NP_NAMES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
)
_NP_TORCH = {n: _ALL_DTYPES[n] for n in _NP_NAMES if n in _ALL_DTYPES}

#: Container tags and how many header items follow the tag before the children.
_CONTAINERS = {"list": 0, "tuple": 0, "dict": 0, "odict": 0, "namespace": 0, "set": 0, "frozenset": 0,
               "defaultdict": 1, "object": 1}
_CONTAINER_TAGS = frozenset(_CONTAINERS)
_MAPPING_TAGS = frozenset(("dict", "odict", "namespace", "defaultdict"))
_PENDING = object()
#: A path component that names nothing (the plain value inside an "object" node).
_PASS = (None, None)
#: defaultdict factories stored by name: builtin types only (registered ones as ["type", NAME]).
_FACTORY_NAMES = {list: "list", dict: "dict", set: "set", frozenset: "frozenset", tuple: "tuple", int: "int",
                  float: "float", complex: "complex", str: "str", bytes: "bytes", bool: "bool",
                  OrderedDict: "odict"}
_FACTORIES = {name: factory for factory, name in _FACTORY_NAMES.items()}


@dataclass
class TensorEntry:
    """One stored tensor: contiguous, on the CPU, detached."""

    name: str
    tensor: torch.Tensor


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #


def _where(path) -> str:
    return "obj" + "".join(f"[{p[1]!r}]" for p in path if p is not _PASS)


def _type_name(t: type) -> str:
    mod = getattr(t, "__module__", "builtins")
    return t.__qualname__ if mod == "builtins" else f"{mod}.{t.__qualname__}"


def _short_repr(x, limit=80) -> str:
    try:
        r = repr(x)
    except Exception:  # pragma: no cover
        r = object.__repr__(x)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _int_text(x: int) -> str:
    if x.bit_length() <= _DECIMAL_BITS:
        return str(x)
    return ("-0x" if x < 0 else "0x") + format(abs(x), "x")


def _enc_int(x: int):
    return x if -_SAFE_INT <= x <= _SAFE_INT else ["int", _int_text(x)]


def _enc_float(x: float):
    if math.isfinite(x):
        return x
    return ["float", "nan" if x != x else ("inf" if x > 0 else "-inf")]


def _b64(data: bytes, path) -> str:
    text = base64.b64encode(data).decode("ascii")
    if len(text) > MAX_STR_LEN:
        raise ValueError(f"bytes of length {len(data)} at {_where(path)} exceed the limit (MAX_STR_LEN)")
    return text


def _enc_str(x: str, path):
    if len(x) > MAX_STR_LEN:
        raise ValueError(f"str of length {len(x)} at {_where(path)} exceeds MAX_STR_LEN={MAX_STR_LEN}")
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return ["str", _b64(x.encode("utf-8", "surrogatepass"), path)]
    return x


def _enc_complex(x: complex):
    return ["complex", _enc_float(x.real), _enc_float(x.imag)]


def _enc_key(k, path):
    t = type(k)
    if k is None or t is bool:
        return k
    if t is int:
        return _enc_int(k)
    if t is float:
        return _enc_float(k)
    if t is str:
        return _enc_str(k, path)
    raise TypeError(
        f"unsupported dict key type {_type_name(t)} at {_where(path)} (key {_short_repr(k)}); "
        "keys must be str, int, float, bool or None"
    )


_LEAF_ENCODERS: dict[type, Callable] = {
    type(None): lambda x, p: None,
    bool: lambda x, p: x,
    int: lambda x, p: _enc_int(x),
    float: lambda x, p: _enc_float(x),
    complex: lambda x, p: _enc_complex(x),
    str: _enc_str,
    bytes: lambda x, p: ["bytes", _b64(x, p)],
    bytearray: lambda x, p: ["bytearray", _b64(bytes(x), p)],
    torch.dtype: lambda x, p: ["dtype", str(x)[6:]],
    torch.device: lambda x, p: ["device", str(x)],
    torch.Size: lambda x, p: ["size", *[int(d) for d in x]],
}
for _type, _encode in tree_stdlib.LEAF_ENCODERS.items():
    _LEAF_ENCODERS[_type] = (lambda enc: lambda x, p: enc(x, _where(p)))(_encode)


def _contiguous_strides(shape) -> list[int]:
    strides = []
    acc = 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(int(s), 1)
    return strides[::-1]


def _extent(shape, stride) -> int:
    """Elements from the first to one past the last element a view reaches."""
    return 1 + sum((int(s) - 1) * int(st) for s, st in zip(shape, stride))


class _Rec:
    __slots__ = ("t", "kind", "np_dtype", "device", "requires_grad", "name", "groupable")

    def __init__(self, t, kind, np_dtype, device, requires_grad, name, groupable):
        self.t = t
        self.kind = kind
        self.np_dtype = np_dtype
        self.device = device
        self.requires_grad = requires_grad
        self.name = name
        self.groupable = groupable


def _path_name(path) -> str:
    path = [p for p in path if p is not _PASS]
    if not path:
        return _ROOT_NAME
    name = ".".join(str(c) for _, c in path)
    name = name.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(name) > MAX_NAME_LEN - 16:
        name = name[: MAX_NAME_LEN - 16]
    return name


class _Encoder:
    def __init__(self):
        self.records: list[_Rec] = []
        self.memo: dict[int, int] = {}
        self.keep: list[Any] = []  # keeps memoised objects alive (ids stay unique)

    # -- tensors ------------------------------------------------------------ #
    def tensor(self, x, path):
        rid = self.memo.get(id(x))
        if rid is not None:
            return ["tensor", rid]
        if isinstance(x, torch.Tensor):
            rec = self._torch_rec(x, path)
        else:
            rec = self._numpy_rec(x, path)
        rid = len(self.records)
        self.records.append(rec)
        self.memo[id(x)] = rid
        self.keep.append(x)
        return ["tensor", rid]

    def _torch_rec(self, x: torch.Tensor, path) -> _Rec:
        if x.layout != torch.strided:
            raise TypeError(f"unsupported tensor layout {x.layout} at {_where(path)}")
        if x.is_quantized:
            raise TypeError(f"unsupported quantized tensor at {_where(path)}")
        if getattr(x, "is_nested", False):
            raise TypeError(f"unsupported nested tensor at {_where(path)}")
        if x.is_meta:
            raise TypeError(f"unsupported meta tensor (it has no data) at {_where(path)}")
        if any(n is not None for n in (getattr(x, "names", None) or ())):
            raise TypeError(f"unsupported named tensor at {_where(path)}; drop the names with .rename(None)")
        if x.dtype not in _STORABLE_DTYPES:
            raise TypeError(f"unsupported tensor dtype {x.dtype} at {_where(path)}")
        if x.dim() > MAX_NDIM:
            raise ValueError(f"tensor with {x.dim()} dimensions at {_where(path)} exceeds MAX_NDIM={MAX_NDIM}")
        t = x.detach()
        groupable = True
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
            groupable = False
        kind = "parameter" if type(x) is torch.nn.Parameter else "tensor"
        return _Rec(t, kind, None, "cpu" if x.is_cpu else str(x.device), bool(x.requires_grad), _path_name(path),
                    groupable)

    def _numpy_rec(self, x, path) -> _Rec:
        name = x.dtype.name
        if name not in _NP_TORCH or x.dtype.kind not in "biufc":
            raise TypeError(f"unsupported numpy.ndarray dtype {x.dtype} at {_where(path)}")
        if x.ndim > MAX_NDIM:
            raise ValueError(f"ndarray with {x.ndim} dimensions at {_where(path)} exceeds MAX_NDIM={MAX_NDIM}")
        arr = np.array(x, dtype=x.dtype.newbyteorder("="), order="C", copy=True)
        t = torch.from_numpy(arr)
        return _Rec(t, "ndarray", name, "cpu", False, _path_name(path), False)

    def npscalar(self, x, path):
        name = np.dtype(type(x)).name
        kind = np.dtype(type(x)).kind
        if name not in _NP_TORCH or kind not in "biufc":
            raise TypeError(f"unsupported type {_type_name(type(x))} at {_where(path)}")
        if kind == "b":
            v = bool(x)
        elif kind in "iu":
            v = _enc_int(int(x))
        elif kind == "f":
            v = _enc_float(float(x))
        else:
            v = _enc_complex(complex(x))
        return ["npscalar", name, v]

    # -- traversal ---------------------------------------------------------- #
    def leaf(self, x, path):
        t = type(x)
        enc = _LEAF_ENCODERS.get(t)
        if enc is not None:
            return enc(x, path)
        if t is torch.Tensor or t is torch.nn.Parameter:
            return self.tensor(x, path)
        if np is not None:
            if t is np.ndarray:
                return self.tensor(x, path)
            if isinstance(x, np.generic):
                return self.npscalar(x, path)
        if isinstance(x, torch.Tensor):
            raise TypeError(
                f"unsupported tensor subclass {_type_name(t)} at {_where(path)}; "
                "only torch.Tensor and torch.nn.Parameter are stored"
            )
        raise TypeError(f"unsupported type {_type_name(t)} at {_where(path)}")

    def run(self, obj):
        holder: list = []
        stack: list = []  # frames: [is_dict, iterator, node, id]
        active: set[int] = set()
        path: list = []  # (is_key, component) of the child being encoded, per frame
        pending = (obj, holder)
        count = 0
        while True:
            if pending is not None:
                x, dest = pending
                pending = None
                count += 1
                if count > MAX_NODES:
                    raise ValueError(f"object has more than MAX_NODES={MAX_NODES} nodes (at {_where(path)})")
                t = type(x)
                opened = self.container(x, t, path)
                if opened is not None:
                    cid = id(x)
                    if cid in active:
                        raise ValueError(f"self-referencing container ({_type_name(t)}) at {_where(path)}")
                    if len(stack) >= MAX_DEPTH:
                        raise ValueError(
                            f"containers nested deeper than MAX_DEPTH={MAX_DEPTH} at {_where(path)}"
                        )
                    node, kind, items = opened
                    dest.append(node)
                    active.add(cid)
                    stack.append([kind, iter(items), node, cid, x])
                else:
                    dest.append(self.leaf(x, path))
                    if stack:
                        path.pop()
            if not stack:
                break
            frame = stack[-1]
            nxt = next(frame[1], _PENDING)
            if nxt is _PENDING:
                stack.pop()
                active.discard(frame[3])
                if stack:
                    path.pop()
                continue
            k, v = nxt
            if frame[0] == "map":
                path.append((True, k))
                frame[2].append(_enc_key(k, path))
            elif frame[0] == "seq":
                path.append((False, k))
            else:
                path.append(_PASS)
            pending = (v, frame[2])
        return holder[0]

    def container(self, x, t, path):
        """``(node header, "map" | "seq" | "pass", children)`` for a container, else None."""
        if t is dict or t is OrderedDict:
            return ["dict" if t is dict else "odict"], "map", list(x.items())
        if t is list or t is tuple:
            return ["list" if t is list else "tuple"], "seq", list(enumerate(x))
        if t is set or t is frozenset:
            return ["set" if t is set else "frozenset"], "seq", list(enumerate(x))
        if t is defaultdict:
            return ["defaultdict", self.factory(x.default_factory, path)], "map", list(x.items())
        if t is argparse.Namespace:
            items = list(vars(x).items())
            for k, _ in items:
                if type(k) is not str:
                    raise TypeError(f"argparse.Namespace with a non-str attribute name at {_where(path)}")
            return ["namespace"], "map", items
        reg = registry.registration_for_type(t)
        if reg is not None:
            return ["object", reg.name], "pass", [(None, reg.to_plain(x))]
        return None

    @staticmethod
    def factory(factory, path):
        if factory is None:
            return None
        name = _FACTORY_NAMES.get(factory) if isinstance(factory, type) else None
        if name is not None:
            return name
        reg = registry.registration_for_type(factory) if isinstance(factory, type) else None
        if reg is not None:
            return ["type", reg.name]
        raise TypeError(
            f"unsupported defaultdict default_factory {_short_repr(factory)} at {_where(path)}; only builtin "
            "types (list, dict, set, int, ...), OrderedDict and registered types are stored"
        )

    # -- storage units ------------------------------------------------------ #
    def units(self):
        """Group records into storage units; yields (member rids) in entry order."""
        groups: dict[tuple, list[int]] = {}
        units: list[list[int]] = []
        for rid, rec in enumerate(self.records):
            key = None
            t = rec.t
            if rec.groupable and t.numel() > 0:
                try:
                    st = t.untyped_storage()
                    ptr = st.data_ptr()
                    if ptr:
                        key = (str(t.device), ptr, st.nbytes())
                except Exception:  # devices without addressable storage
                    key = None
            if key is None:
                units.append([rid])
            else:
                groups.setdefault(key, []).append(rid)
        for members in groups.values():
            if len(members) == 1:
                units.append(members)
                continue
            spans = []
            for rid in members:
                t = self.records[rid].t
                isz = t.element_size()
                start = t.storage_offset() * isz
                spans.append((start, start + _extent(t.shape, t.stride()) * isz, rid))
            spans.sort()
            cur: list[int] = []
            cur_end = -1
            for start, end, rid in spans:
                if cur and start < cur_end:
                    cur.append(rid)
                    cur_end = max(cur_end, end)
                else:
                    if cur:
                        units.append(sorted(cur))
                    cur = [rid]
                    cur_end = end
            units.append(sorted(cur))
        units.sort(key=lambda u: u[0])
        return units

    def build_unit(self, members, stage=None):
        """Return (data tensor, {rid: (offset, stride)}); ``stage`` (if given)
        makes the CPU copy of the data instead of ``Tensor.cpu``."""
        recs = [self.records[r] for r in members]
        if len(members) == 1:
            t = recs[0].t
            if t.numel() == 0:
                data = torch.empty(tuple(t.shape), dtype=t.dtype)
                views = {members[0]: (0, list(t.stride()))}
            elif t.is_contiguous():
                data = t
                views = {members[0]: (0, list(t.stride()))}
            else:
                ext = _extent(t.shape, t.stride())
                if ext <= t.numel():  # transposed / broadcast: keep the layout
                    data = t.as_strided((ext,), (1,), t.storage_offset())
                    views = {members[0]: (0, list(t.stride()))}
                else:
                    data = t.contiguous()
                    views = {members[0]: (0, _contiguous_strides(t.shape))}
        elif len({r.t.dtype for r in recs}) == 1:
            t0 = recs[0].t
            lo = min(r.t.storage_offset() for r in recs)
            hi = max(r.t.storage_offset() + _extent(r.t.shape, r.t.stride()) for r in recs)
            data = t0.as_strided((hi - lo,), (1,), lo)
            views = {rid: (r.t.storage_offset() - lo, list(r.t.stride())) for rid, r in zip(members, recs)}
        else:
            align = max(r.t.element_size() for r in recs)
            lo = min(r.t.storage_offset() * r.t.element_size() for r in recs)
            lo -= lo % align
            hi = max(
                (r.t.storage_offset() + _extent(r.t.shape, r.t.stride())) * r.t.element_size() for r in recs
            )
            t0 = recs[0].t
            data = torch.empty((0,), dtype=torch.uint8, device=t0.device)
            data.set_(t0.untyped_storage(), lo, (hi - lo,), (1,))
            views = {}
            for rid, r in zip(members, recs):
                isz = r.t.element_size()
                views[rid] = ((r.t.storage_offset() * isz - lo) // isz, list(r.t.stride()))
        if stage is not None:
            data = stage(data)
        elif data.device.type != "cpu":
            data = data.cpu()
        if not data.is_contiguous():  # pragma: no cover - defensive
            data = data.contiguous()
        return data, views


def flatten(obj, *, stage: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[dict, list[TensorEntry]]:
    """Encode ``obj`` into ``(skeleton, entries)``.

    ``stage(data)``, if given, is called once per stored tensor (on its
    original device) and returns the CPU tensor to store: a snapshot copy for
    an asynchronous save. Without it, CPU data is referenced, not copied.

    ``skeleton`` is JSON-serialisable (see the module docstring); ``entries`` are
    the tensors to store, ordered by first appearance in ``obj``. Raises
    ``TypeError`` for an unsupported type and ``ValueError`` for a
    self-referencing container or a limit exceeded, naming where in ``obj``.
    """
    enc = _Encoder()
    root = enc.run(obj)
    entries: list[TensorEntry] = []
    entry_recs: list[dict] = []
    tensor_recs: list[dict | None] = [None] * len(enc.records)
    used: set[str] = set()
    for members in enc.units():
        data, views = enc.build_unit(members, stage)
        base = enc.records[members[0]].name
        name = base
        n = 1
        while name in used:
            n += 1
            name = f"{base}#{n}"
        used.add(name)
        e = len(entries)
        entries.append(TensorEntry(name, data))
        entry_recs.append({"name": name, "dtype": str(data.dtype)[6:], "shape": list(data.shape)})
        for rid in members:
            rec = enc.records[rid]
            offset, stride = views[rid]
            d = {
                "entry": e,
                "dtype": str(rec.t.dtype)[6:],
                "offset": int(offset),
                "shape": [int(s) for s in rec.t.shape],
                "stride": [int(s) for s in stride],
                "device": rec.device,
                "requires_grad": rec.requires_grad,
                "kind": rec.kind,
            }
            if rec.kind == "ndarray":
                d["np_dtype"] = rec.np_dtype
            tensor_recs[rid] = d
    skeleton = {
        "format": FORMAT_NAME,
        "version": TREE_VERSION,
        "root": root,
        "tensors": tensor_recs,
        "entries": entry_recs,
    }
    return skeleton, entries


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #


def _err(msg, field=None):
    return FormatError(f"malformed skeleton: {msg}", field=None if field is None else str(field))


def _node_where(stack) -> str:
    return "root" + "".join(f"[{f[2] - 1}]" for f in stack)


class _Where:
    """The path of the node being decoded (``root[3][1]``), spelled out only when an error names it:
    building it for every leaf was a fifth of a skeleton's check."""

    __slots__ = ("stack",)

    def __init__(self, stack):
        self.stack = stack

    def __str__(self) -> str:
        return _node_where(self.stack)


def _check_len(node, n, where):
    if len(node) != n:
        raise _err(f"{node[0]!r} node must have {n - 1} argument(s), got {len(node) - 1}", where)


def _dec_text(x, where, what="string"):
    if type(x) is not str:
        raise _err(f"expected a {what}, got {type(x).__name__}", where)
    if len(x) > MAX_STR_LEN:
        raise _err(f"{what} of {len(x)} characters exceeds MAX_STR_LEN={MAX_STR_LEN}", where)
    return x


def _dec_b64(x, where) -> bytes:
    text = _dec_text(x, where, "base64 text")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, binascii.Error, UnicodeEncodeError) as e:
        raise _err(f"bad base64 ({e})", where) from None


def _dec_int_text(x, where) -> int:
    text = _dec_text(x, where, "integer text")
    if _HEX_RE.fullmatch(text):
        neg = text.startswith("-")
        v = int(text[3:] if neg else text[2:], 16)
        return -v if neg else v
    if _DEC_RE.fullmatch(text):
        if len(text.lstrip("-")) > MAX_DECIMAL_DIGITS:
            raise _err(f"decimal integer longer than {MAX_DECIMAL_DIGITS} digits", where)
        return int(text)
    raise _err(f"bad integer text {_short_repr(text)}", where)


def _dec_float_part(x, where) -> float:
    t = type(x)
    if t is float:
        return x
    if t is int:
        return float(x) if -_MAX_INDEX <= x <= _MAX_INDEX else math.copysign(math.inf, x)
    if t is list and len(x) == 2 and x[0] == "float":
        return _dec_nonfinite(x, where)
    raise _err("expected a float", where)


def _dec_nonfinite(node, where):
    _check_len(node, 2, where)
    v = _NONFINITE.get(node[1]) if type(node[1]) is str else None
    if v is None:
        raise _err(f"bad non-finite float {_short_repr(node[1])}", where)
    # a fresh object per NaN: dicts tell NaN keys apart by identity
    return float("nan") if v != v else v


def _dec_dtype_name(x, where, table=_ALL_DTYPES) -> torch.dtype:
    d = table.get(x) if type(x) is str else None
    if d is None:
        if type(x) is not str or len(x) > 64 or not _NAME_RE.fullmatch(x):
            raise _err(f"bad dtype name {_short_repr(x)}", where)
        raise _err(f"unknown or unsupported dtype {x!r}", where)
    return d


_DEVICE_CACHE: dict[str, torch.device] = {}


def _dec_device(x, where) -> torch.device:
    if type(x) is not str or len(x) > MAX_DEVICE_LEN:
        raise _err(f"bad device {_short_repr(x)}", where)
    d = _DEVICE_CACHE.get(x)
    if d is None:
        try:
            d = torch.device(x)
        except Exception:
            raise _err(f"bad device {_short_repr(x)}", where) from None
        if len(_DEVICE_CACHE) < 256:
            _DEVICE_CACHE[x] = d
    return d


def _dec_index_int(x, where, what, lo=0, hi=_MAX_INDEX):
    if type(x) is not int or not lo <= x < hi:
        raise _err(f"{what} must be an integer in [{lo}, {hi}), got {_short_repr(x)}", where)
    return x


def _dec_npscalar(node, where, tensor_at):
    _check_len(node, 3, where)
    name = node[1]
    if np is None:  # pragma: no cover
        raise _err("numpy scalar in skeleton but numpy is not installed", where)
    if type(name) is not str or name not in _NP_TORCH:
        raise _err(f"bad numpy scalar dtype {_short_repr(name)}", where)
    dt = np.dtype(name)
    v = node[2]
    if dt.kind == "b":
        if type(v) is not bool:
            raise _err("numpy bool scalar needs a JSON boolean", where)
    elif dt.kind in "iu":
        if type(v) is list and len(v) == 2 and v[0] == "int":
            v = _dec_int_text(v[1], where)
        elif type(v) is not int:
            raise _err("numpy integer scalar needs an integer", where)
        info = np.iinfo(dt)
        if not info.min <= v <= info.max:
            raise _err(f"value out of range for numpy {name}", where)
    elif dt.kind == "f":
        v = _dec_float_part(v, where)
    else:
        if type(v) is not list or len(v) != 3 or v[0] != "complex":
            raise _err("numpy complex scalar needs a complex node", where)
        v = complex(_dec_float_part(v[1], where), _dec_float_part(v[2], where))
    with np.errstate(all="ignore"):
        return dt.type(v)


def _dec_leaf(node, where, tensor_at):
    t = type(node)
    if node is None or t is bool or t is int or t is float:
        return node
    if t is str:
        return _dec_text(node, where)
    if t is not list:
        raise _err(f"unexpected JSON value of type {t.__name__}", where)
    if not node or type(node[0]) is not str:
        raise _err("a node array must start with a tag string", where)
    tag = node[0]
    if tag == "int":
        _check_len(node, 2, where)
        return _dec_int_text(node[1], where)
    if tag == "float":
        return _dec_nonfinite(node, where)
    if tag == "str":
        _check_len(node, 2, where)
        try:
            return _dec_b64(node[1], where).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise _err("tagged str is not UTF-8", where) from None
    if tag == "tensor":
        _check_len(node, 2, where)
        return tensor_at(node[1], where)
    if tag == "dtype":
        _check_len(node, 2, where)
        return _dec_dtype_name(node[1], where)
    if tag == "device":
        _check_len(node, 2, where)
        return _dec_device(node[1], where)
    if tag == "size":
        if len(node) - 1 > MAX_NODES:  # pragma: no cover - bounded by MAX_NODES anyway
            raise _err("size too long", where)
        return torch.Size([_dec_index_int(d, where, "size element", -(1 << 63), 1 << 63) for d in node[1:]])
    if tag == "bytes":
        _check_len(node, 2, where)
        return _dec_b64(node[1], where)
    if tag == "bytearray":
        _check_len(node, 2, where)
        return bytearray(_dec_b64(node[1], where))
    if tag == "complex":
        _check_len(node, 3, where)
        return complex(_dec_float_part(node[1], where), _dec_float_part(node[2], where))
    if tag == "npscalar":
        return _dec_npscalar(node, where, tensor_at)
    if tag in tree_stdlib.LEAF_TAGS:
        return tree_stdlib.decode_leaf(node, where)
    raise _err(f"unknown tag {_short_repr(tag)}", where)


def _dec_key(node, where):
    t = type(node)
    if node is None or t is bool or t is int or t is float or t is str:
        return _dec_leaf(node, where, None)
    if t is list and node and node[0] in ("int", "float", "str"):
        return _dec_leaf(node, where, None)
    raise _err("dict key must be null, a boolean, a number, a string or an int/float/str node", where)


def _decode(root, tensor_at, build=True):
    """Iteratively decode a NODE; never recurses, so depth cannot blow the stack.
    With ``build=False`` (validation) registered types are checked for form
    only: nothing is looked up or called."""
    stack: list = []  # frames: [tag, node, next_pos, values]
    where = _Where(stack)
    count = 0
    x = root
    while True:
        count += 1
        if count > MAX_NODES:
            raise _err(f"more than MAX_NODES={MAX_NODES} nodes", _node_where(stack))
        if type(x) is list and x and type(x[0]) is str and x[0] in _CONTAINER_TAGS:
            if len(stack) >= MAX_DEPTH:
                raise _err(f"containers nested deeper than MAX_DEPTH={MAX_DEPTH}", _node_where(stack))
            tag = x[0]
            start = 1 + _CONTAINERS[tag]
            if len(x) < start or (tag == "object" and len(x) != 3):
                raise _err(f"{tag!r} node has the wrong number of items", _node_where(stack))
            if tag in _MAPPING_TAGS and (len(x) - start) % 2:
                raise _err("dict node must hold key/value pairs", _node_where(stack))
            stack.append([tag, x, start, [], start, _open_header(tag, x, _node_where(stack), build)])
            v = _PENDING
        else:
            v = _dec_leaf(x, where, tensor_at)
        while True:
            if v is not _PENDING:
                if not stack:
                    return v
                stack[-1][3].append(v)
            frame = stack[-1]
            tag, node, pos, vals, start, header = frame
            if pos < len(node):
                if tag in _MAPPING_TAGS and (pos - start) % 2 == 0:
                    frame[2] = pos + 1
                    vals.append(_dec_key(node[pos], where))
                    pos += 1
                x = node[pos]
                frame[2] = pos + 1
                break
            stack.pop()
            v = _close(tag, vals, header, _node_where(stack), build)


class _Opaque:
    """What an "object" node is while a skeleton is only being validated."""

    __slots__ = ()


def _open_header(tag, node, where, build):
    """Check a container's header items; returns the defaultdict factory or the object's type name."""
    if tag == "object":
        if not registry.valid_type_name(node[1]):
            raise _err(f"bad type name {_short_repr(node[1])}", where)
        return node[1]
    if tag != "defaultdict":
        return None
    spec = node[1]
    if spec is None:
        return None
    if type(spec) is str:
        factory = _FACTORIES.get(spec)
        if factory is None:
            raise _err(f"unknown defaultdict factory {_short_repr(spec)}", where)
        return factory
    if type(spec) is not list or len(spec) != 2 or spec[0] != "type" or not registry.valid_type_name(spec[1]):
        raise _err("defaultdict factory must be null, a builtin type name or ['type', NAME]", where)
    reg = registry.registration_for_name(spec[1]) if build else None
    if reg is not None:
        return reg.cls
    if build and registry.unknown_types_mode() != "dict":
        raise UnregisteredTypeError(
            f"a defaultdict's factory is the type {spec[1]!r}, which this program has not registered "
            "(torch_dtdr.register_type); nothing a file names is imported", field=where)
    return None


def _close(tag, vals, header, where, build):
    """Build a container from its decoded children."""
    if tag == "list":
        return vals
    if tag == "tuple":
        return tuple(vals)
    if tag == "set" or tag == "frozenset":
        try:
            out = (set if tag == "set" else frozenset)(vals)
        except TypeError as e:
            raise _err(f"unhashable {tag} element ({e})", where) from None
        if len(out) != len(vals):
            raise _err(f"duplicate {tag} element", where)
        return out
    if tag == "object":
        return _rebuild_object(header, vals[0], where, build)
    keys = vals[0::2]
    if tag == "defaultdict":
        out = defaultdict(header, zip(keys, vals[1::2]))
    else:
        out = (OrderedDict if tag == "odict" else dict)(zip(keys, vals[1::2]))
    if len(out) != len(keys):
        raise _err("duplicate dict key", where)
    if tag == "namespace":
        if any(type(k) is not str for k in keys):
            raise _err("namespace attribute names must be strings", where)
        try:
            return argparse.Namespace(**out)
        except (TypeError, AttributeError, ValueError) as e:  # "__class__", "__dict__" and the like
            raise _err(f"bad namespace attribute ({e})", where) from None
    return out


def _rebuild_object(name, plain, where, build):
    if not build:
        return _Opaque()
    reg = registry.registration_for_name(name)
    if reg is None:
        if registry.unknown_types_mode() == "dict":
            return {registry.UNKNOWN_TYPE_KEY: name, "value": plain}
        raise UnregisteredTypeError(
            f"the file holds an object of type {name!r}, which this program has not registered "
            "(torch_dtdr.register_type); nothing a file names is imported. Register it, or load inside "
            "torch_dtdr.unknown_types_as_dicts() to get it as a plain dict", field=where)
    try:
        return reg.from_plain(plain)
    except Exception as e:  # noqa: BLE001 - the file's data made the registered converter fail
        raise FormatError(f"malformed skeleton: cannot rebuild a {name!r} from its stored value "
                          f"({type(e).__name__}: {e})", field=where) from e


class TreeTables:
    """A skeleton's checked tables: what :func:`check` returns and :func:`unflatten` rebuilds from."""

    __slots__ = ("entries", "records", "align")

    def __init__(self, entries, records, align):
        self.entries = entries  # (name, dtype, numel, nbytes)
        self.records = records  # (entry, dtype, offset, shape, stride, device, requires_grad, kind, np_dtype)
        self.align = align  # per entry: largest itemsize viewing it


_TOP_KEYS = frozenset(("format", "version", "root", "tensors", "entries"))
_ENTRY_KEYS = frozenset(("name", "dtype", "shape"))
_REC_KEYS = frozenset(("entry", "dtype", "offset", "shape", "stride", "device", "requires_grad", "kind"))
_REC_KEYS_ND = _REC_KEYS | {"np_dtype"}


def _dims(x, where, what):
    if type(x) is not list:
        raise _err(f"{what} must be a list", where)
    if len(x) > MAX_NDIM:
        raise _err(f"{what} has {len(x)} dimensions, more than MAX_NDIM={MAX_NDIM}", where)
    label = what + " element"
    return [d if type(d) is int and 0 <= d < _MAX_INDEX else _dec_index_int(d, where, label) for d in x]


def _check_top(skeleton):
    if type(skeleton) is not dict:
        raise _err(f"skeleton must be a JSON object, got {type(skeleton).__name__}")
    keys = set(skeleton)
    if keys != _TOP_KEYS:
        raise _err(f"skeleton members must be {sorted(_TOP_KEYS)}, got {sorted(map(str, keys))}")
    if skeleton["format"] != FORMAT_NAME:
        raise _err(f"not a {FORMAT_NAME} skeleton (format={_short_repr(skeleton['format'])})", "format")
    v = skeleton["version"]
    if type(v) is not int:
        raise _err("version must be an integer", "version")
    if v != TREE_VERSION:
        if v > TREE_VERSION:
            raise UnsupportedVersionError(
                f"tree version {v} is newer than this reader supports ({TREE_VERSION})", field="version"
            )
        raise _err(f"unknown tree version {v}", "version")


def _check_entries(skeleton, n_tensors):
    entries = skeleton["entries"]
    if type(entries) is not list:
        raise _err("entries must be a list", "entries")
    if n_tensors is not None and len(entries) != n_tensors:
        raise _err(f"skeleton lists {len(entries)} entries but the container holds {n_tensors}", "entries")
    out = []
    names: set[str] = set()
    for i, e in enumerate(entries):
        where = f"entries[{i}]"
        if type(e) is not dict or set(e) != _ENTRY_KEYS:
            raise _err(f"entry must be an object with members {sorted(_ENTRY_KEYS)}", where)
        name = e["name"]
        if type(name) is not str or len(name) > MAX_NAME_LEN:
            raise _err(f"entry name must be a string of at most {MAX_NAME_LEN} characters", where + ".name")
        if name in names:
            raise _err(f"duplicate entry name {name!r}", where + ".name")
        names.add(name)
        dtype = _dec_dtype_name(e["dtype"], where + ".dtype", _STORABLE)
        shape = _dims(e["shape"], where + ".shape", "shape")
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if nbytes > _MAX_INDEX:
            raise _err("entry too large", where + ".shape")
        out.append((name, dtype, numel, nbytes))
    return out


def _check_tables(skeleton, n_tensors) -> TreeTables:
    _check_top(skeleton)
    entries = _check_entries(skeleton, n_tensors)
    tensors = skeleton["tensors"]
    if type(tensors) is not list:
        raise _err("tensors must be a list", "tensors")
    align = [1] * len(entries)
    records = []
    for i, r in enumerate(tensors):
        where = f"tensors[{i}]"
        if type(r) is not dict:
            raise _err("tensor record must be an object", where)
        kind = r.get("kind")
        if kind not in ("tensor", "parameter", "ndarray"):
            raise _err(f"bad kind {_short_repr(kind)}", where + ".kind")
        if set(r) != (_REC_KEYS_ND if kind == "ndarray" else _REC_KEYS):
            raise _err("tensor record has missing or unknown members", where)
        e = _dec_index_int(r["entry"], where + ".entry", "entry", 0, len(entries))
        dtype = _dec_dtype_name(r["dtype"], where + ".dtype", _STORABLE)
        offset = _dec_index_int(r["offset"], where + ".offset", "offset")
        shape = _dims(r["shape"], where + ".shape", "shape")
        stride = _dims(r["stride"], where + ".stride", "stride")
        if len(stride) != len(shape):
            raise _err("stride and shape differ in length", where + ".stride")
        device = r["device"]
        # syntax only: a file written on a backend this torch lacks still loads
        if type(device) is not str or len(device) > MAX_DEVICE_LEN or not _DEVICE_RE.fullmatch(device):
            raise _err(f"bad device {_short_repr(device)}", where + ".device")
        rg = r["requires_grad"]
        if type(rg) is not bool:
            raise _err("requires_grad must be a boolean", where + ".requires_grad")
        if rg and not (dtype.is_floating_point or dtype.is_complex):
            raise _err(f"requires_grad on a {dtype} tensor", where + ".requires_grad")
        np_dtype = None
        if kind == "ndarray":
            np_dtype = r["np_dtype"]
            if type(np_dtype) is not str or _NP_TORCH.get(np_dtype) != dtype:
                raise _err(f"np_dtype {_short_repr(np_dtype)} does not match dtype", where + ".np_dtype")
            if rg:
                raise _err("an ndarray cannot require grad", where + ".requires_grad")
        _, edtype, _, enbytes = entries[e]
        if dtype != edtype and edtype != torch.uint8:
            raise _err(f"a {dtype} view of a {edtype} entry (only uint8 entries may be reinterpreted)", where)
        isz = dtype.itemsize
        if offset * isz > enbytes:
            raise _err("offset lies outside the entry", where + ".offset")
        if kind == "ndarray" and math.prod(shape) * isz > _MAX_INDEX:  # numpy refuses such a broadcast view
            raise _err("ndarray view of more than 2**62 bytes", where + ".shape")
        if math.prod(shape) > 0:
            reach = (offset + sum((s - 1) * st for s, st in zip(shape, stride)) + 1) * isz
            if reach > enbytes:
                raise _err(f"view reaches byte {reach} of a {enbytes}-byte entry", where)
        align[e] = max(align[e], isz)
        records.append((e, dtype, offset, tuple(shape), tuple(stride), device, rg, kind, np_dtype))
    return TreeTables(entries, records, align)


def validate(skeleton, n_tensors) -> None:
    """Raise :class:`FormatError` unless ``skeleton`` is well-formed for a
    container holding ``n_tensors`` stored tensors (``None``: do not check the
    count). Checks every node, limit and view bound; never recurses."""
    _check_root(skeleton, _check_tables(skeleton, n_tensors))


def _check_root(skeleton, tables) -> None:
    n = len(tables.records)

    def placeholder(i, where):
        return _dec_index_int(i, where, "tensor index", 0, n)

    _decode(skeleton["root"], placeholder, build=False)


def tensor_paths(skeleton) -> list[str]:
    """The stored entries' names, in entry order."""
    _check_top(skeleton)
    return [e[0] for e in _check_entries(skeleton, None)]


class Builder:
    """Rebuilds tensors (views, sharing, Parameters, ndarrays) over loaded entries.

    ``get_tensor(e)`` returns entry ``e``'s data (any shape with the entry's
    element count and dtype) on the device it should live on; it is called at
    most once per entry, and only for entries that are used."""

    def __init__(self, skeleton, get_tensor: Callable[[int], torch.Tensor], tables=None):
        self.tables = tables if tables is not None else _check_tables(skeleton, None)
        self.get_tensor = get_tensor
        self.loaded: dict[int, torch.Tensor] = {}
        self.built: dict[int, Any] = {}
        self.whole: set[int] = set()  # entries whose loaded tensor was handed out as a record itself

    def load(self, e):
        if e in self.loaded:
            return self.loaded[e]
        tables = self.tables
        name, dtype, numel, _ = tables.entries[e]
        base = self.get_tensor(e)
        if base is None:  # the loader lost this entry: every tensor over it comes back as None
            self.loaded[e] = None
            return None
        if not isinstance(base, torch.Tensor):
            raise FormatError(f"entry {e} loaded as {type(base).__name__}, not a tensor", tensor=name)
        if base.dtype != dtype or base.numel() != numel:
            raise FormatError(
                f"entry {e} loaded as {base.dtype} with {base.numel()} elements; the skeleton says "
                f"{dtype} with {numel}",
                tensor=name,
            )
        if base.requires_grad:
            base = base.detach()
        if not base.is_contiguous():
            base = base.contiguous()
        if (base.storage_offset() * base.element_size()) % tables.align[e]:
            base = base.clone()  # realign so every view's offset is whole elements
        self.loaded[e] = base
        return base

    def tensor_at(self, i, where="tensor"):
        i = _dec_index_int(i, where, "tensor index", 0, len(self.tables.records))
        if i in self.built:
            return self.built[i]
        e, dtype, offset, shape, stride, _device, rg, kind, np_dtype = self.tables.records[i]
        base = self.load(e)
        if base is None:
            self.built[i] = None
            return None
        if offset == 0 and dtype == base.dtype and base.shape == shape and base.stride() == stride \
                and e not in self.whole:
            t = base  # the record is the whole entry as loaded (a state dict's usual case): no new view
            self.whole.add(e)
        else:
            isz = dtype.itemsize
            start = base.storage_offset() * base.element_size() + offset * isz
            t = torch.empty((0,), dtype=dtype, device=base.device)
            try:
                t.set_(base.untyped_storage(), start // isz, shape, stride)
            except RuntimeError as exc:  # e.g. a size * stride product torch cannot represent
                raise FormatError(f"cannot rebuild view ({exc})", field=f"tensors[{i}]") from None
        if kind == "parameter":
            obj = torch.nn.Parameter(t, requires_grad=rg)
        elif kind == "ndarray":
            obj = (t if t.device.type == "cpu" else t.cpu()).numpy()
        else:
            if rg:
                t.requires_grad_(True)
            obj = t
        self.built[i] = obj
        return obj


def check(skeleton, n_entries: int | None = None) -> TreeTables:
    """The checked tables of ``skeleton`` (its entries and tensor records; a
    :class:`FormatError` if it or its object tree is malformed, or if it does
    not list ``n_entries`` entries), for callers that hand them to
    :func:`unflatten` and :func:`entry_devices` so that a load checks once."""
    tables = _check_tables(skeleton, n_entries)
    _check_root(skeleton, tables)
    return tables


def unflatten(skeleton, get_tensor: Callable[[int], torch.Tensor], tables: TreeTables | None = None):
    """Rebuild the object. ``get_tensor(i)`` returns entry ``i``'s data (any
    shape with the entry's element count and dtype) on the device it should
    live on; it is called at most once per entry, and only for entries the
    object uses. Views and sharing are rebuilt over the returned tensors.
    ``tables``: what :func:`check` returned for this skeleton."""
    if tables is None:
        tables = _check_tables(skeleton, None)
        _check_root(skeleton, tables)  # reject a malformed tree before loading any data
    return _decode(skeleton["root"], Builder(skeleton, get_tensor, tables).tensor_at)


def entry_devices(skeleton, n_entries: int, tables: TreeTables | None = None) -> list[str]:
    """The device each entry was saved from (that of the first tensor viewing
    it; ``"cpu"`` for entries no tensor views). ``tables``: what :func:`check`
    returned for this skeleton."""
    if tables is None:
        tables = _check_tables(skeleton, n_entries)
    out = [None] * len(tables.entries)
    for rec in tables.records:
        e, device = rec[0], rec[5]
        if out[e] is None:
            out[e] = str(device)
    return [d or "cpu" for d in out]


def root_is_mapping(skeleton) -> bool:
    """Whether the saved object is a mapping (dict, OrderedDict, Namespace, defaultdict): a state dict's shape."""
    root = skeleton.get("root") if isinstance(skeleton, dict) else None
    return isinstance(root, list) and bool(root) and root[0] in _MAPPING_TAGS


def tensor_refs(skeleton, n_entries: int) -> dict[str, int]:
    """Every path in the object that holds a tensor (``"model.layer.0.weight"``),
    mapped to its index in ``skeleton["tensors"]``; tied tensors appear under
    each of their paths. Paths use the same spelling as entry names."""
    tables = _check_tables(skeleton, n_entries)
    _check_root(skeleton, tables)
    out: dict[str, int] = {}
    stack = [((), skeleton["root"])]
    while stack:
        path, node = stack.pop()
        if not isinstance(node, list) or not node:
            continue
        tag = node[0]
        children = []
        if tag == "tensor":
            out.setdefault(_path_name([(None, c) for c in path]), node[1])
        elif tag in ("list", "tuple", "set", "frozenset"):
            children = [(path + (i,), v) for i, v in enumerate(node[1:])]
        elif tag == "object" and len(node) == 3:
            children = [(path, node[2])]
        elif tag in _MAPPING_TAGS:
            items = node[1 + _CONTAINERS[tag]:]
            children = [(path + (_key_text(items[j]),), items[j + 1]) for j in range(0, len(items) - 1, 2)]
        stack.extend(reversed(children))
    return out


def _key_text(key) -> str:
    if isinstance(key, list) and len(key) == 2 and key[0] in ("int", "float"):
        return str(key[1])
    if isinstance(key, list) and len(key) == 2 and key[0] == "str":
        return _dec_b64(key[1], "key").decode("utf-8", "surrogatepass")
    return "None" if key is None else str(key)


# --------------------------------------------------------------------------- #
# JSON helpers
# --------------------------------------------------------------------------- #


def skeleton_to_json(skeleton) -> bytes:
    """The skeleton as the UTF-8 JSON bytes the container stores."""
    return canonical_dumps(skeleton)



def skeleton_from_json(data) -> dict:
    """Parse skeleton JSON (bytes or str) strictly: UTF-8 only, no NaN/Infinity
    constants, no duplicate member names. Raises :class:`FormatError`; call
    :func:`validate` on the result."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"skeleton is not UTF-8 ({e})") from None
    try:
        out = strict_loads(data)
    except RecursionError:
        raise FormatError("skeleton JSON is nested too deeply to parse") from None
    except ValueError as e:  # JSONDecodeError, int digit limit, our hooks
        raise FormatError(f"skeleton is not valid JSON ({e})") from None
    if type(out) is not dict:
        raise FormatError("skeleton JSON must be an object")
    return out
