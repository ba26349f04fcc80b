"""Tests for torch_dtdr.tree: pickle-free encoding of nested objects around tensors."""

from __future__ import annotations

import copy
import json
import math
import random
import struct
from collections import OrderedDict, defaultdict, namedtuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_dtdr import tree
from torch_dtdr.errors import FormatError, UnsupportedVersionError
from torch_dtdr.tree import (
    MAX_DEPTH,
    TensorEntry,
    flatten,
    skeleton_from_json,
    skeleton_to_json,
    tensor_paths,
    unflatten,
    validate,
)

# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def roundtrip(obj, *, via_json=True, loader=None):
    """flatten -> (JSON bytes ->) unflatten, with storage simulated by clones."""
    skel, entries = flatten(obj)
    for e in entries:
        assert isinstance(e, TensorEntry)
        assert e.tensor.device.type == "cpu"
        assert e.tensor.is_contiguous()
        assert not e.tensor.requires_grad
    if via_json:
        data = skeleton_to_json(skel)
        skel2 = skeleton_from_json(data)
        assert skel2 == json.loads(data)
        skel = skel2
    validate(skel, len(entries))
    calls = []

    def get_tensor(i):
        calls.append(i)
        if loader is not None:
            return loader(entries[i].tensor)
        return entries[i].tensor.clone()

    out = unflatten(skel, get_tensor)
    assert len(calls) == len(set(calls)), "get_tensor called twice for an entry"
    return out


def _bytes_of(t: torch.Tensor) -> bytes:
    return bytes(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _float_same(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return struct.pack("<d", a) == struct.pack("<d", b)


def same(a, b) -> bool:
    """Deep equality that also checks exact types, float bits (-0.0), NaN == NaN,
    container kinds and key order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return _float_same(a, b)
    if isinstance(a, complex):
        return _float_same(a.real, b.real) and _float_same(a.imag, b.imag)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            same(ka, kb) and same(va, vb) for (ka, va), (kb, vb) in zip(a.items(), b.items())
        )
    if isinstance(a, torch.Tensor):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and a.requires_grad == b.requires_grad
            and _bytes_of(a) == _bytes_of(b)
        )
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    return a == b


def valid_skeleton():
    obj = {"w": torch.arange(6.0).reshape(2, 3), "n": [1, 2.5, "x"], "t": (None, True)}
    return flatten(obj)


# --------------------------------------------------------------------------- #
# scalars
# --------------------------------------------------------------------------- #

SCALARS = [
    None,
    True,
    False,
    0,
    -1,
    7,
    2**53,
    -(2**53),
    2**53 + 1,
    -(2**64) - 5,
    2**127 - 1,
    10**3999,
    -(10**3999),
    2**13000,
    2**13001 + 12345,
    -(2**20000) + 1,
    0.0,
    -0.0,
    0.1,
    1.0,
    -2.5e-300,
    5e-324,
    1.7976931348623157e308,
    1e16,
    math.inf,
    -math.inf,
    math.nan,
    complex(1, -0.0),
    complex(math.nan, math.inf),
    "",
    "plain",
    "unicode é ß 漢字 \U0001f600 \x00 \n \"quotes\"",
    "\ud800",
    "a\udfffb\ud83d",
    "\ud83d\ude00",  # a surrogate *pair* as two code points stays two code points
    b"",
    b"\x00\xffbytes",
    bytearray(b"\x01\x02\x03"),
    bytearray(),
    torch.device("cpu"),
    torch.device("cuda:1"),
    torch.device("cuda"),
    torch.device("meta"),
    torch.Size([]),
    torch.Size([2, 3]),
    torch.Size([-1, 4]),
]


@pytest.mark.parametrize("value", SCALARS, ids=lambda v: type(v).__name__)
def test_scalar_roundtrip(value):
    out = roundtrip({"v": value, "in_list": [value], "in_tuple": (value,)})
    assert same(out, {"v": value, "in_list": [value], "in_tuple": (value,)})


def test_scalar_encodings_are_compact_and_exact():
    skel, _ = flatten([1, 2**53, 2**53 + 1, 0.5, -0.0, math.nan, "s", "\ud800", None, True])
    root = skel["root"]
    assert root[:3] == ["list", 1, 2**53]
    assert root[3] == ["int", str(2**53 + 1)]
    assert root[4] == 0.5 and type(root[4]) is float
    assert root[5] == 0.0 and math.copysign(1, root[5]) == -1
    assert root[6] == ["float", "nan"]
    assert root[7] == "s"
    assert root[8][0] == "str"
    assert root[9:] == [None, True]
    assert flatten(2**20000)[0]["root"][1].startswith("0x")
    assert flatten(-(2**20000))[0]["root"][1].startswith("-0x")
    # the skeleton is encodable exactly the way the container writes it
    json.dumps(skel, allow_nan=False, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@pytest.mark.parametrize("name", sorted(tree._ALL_DTYPES))
def test_every_dtype_value_roundtrips(name):
    d = getattr(torch, name)
    out = roundtrip({"d": d})
    assert out["d"] is d


# --------------------------------------------------------------------------- #
# containers
# --------------------------------------------------------------------------- #


def test_container_types_and_order_preserved():
    obj = OrderedDict(
        [
            ("z", [1, (2, 3), [], (), {}]),
            ("a", {3: "int", "3": "str", None: "none", 2.5: "float", False: "bool"}),
            ("m", OrderedDict([("y", 1), ("x", 2)])),
            ("t", ((((1,),),),)),
        ]
    )
    out = roundtrip(obj)
    assert type(out) is OrderedDict
    assert list(out) == ["z", "a", "m", "t"]
    assert type(out["z"]) is list and type(out["z"][1]) is tuple
    assert type(out["z"][3]) is tuple and type(out["z"][4]) is dict
    assert list(out["a"]) == [3, "3", None, 2.5, False]
    assert type(list(out["a"])[0]) is int
    assert type(list(out["a"])[4]) is bool
    assert type(out["m"]) is OrderedDict and list(out["m"]) == ["y", "x"]
    assert same(out, obj)


def test_bool_keys_stay_bool_and_int_keys_stay_int():
    out = roundtrip({True: "t", 2: "two", 0: "zero"})
    keys = list(out)
    assert keys == [True, 2, 0]
    assert type(keys[0]) is bool and type(keys[1]) is int and type(keys[2]) is int
    out = roundtrip({1: "one"})
    assert type(next(iter(out))) is int


def test_special_float_keys():
    nan_key = float("nan")
    obj = {-0.0: "negzero", nan_key: "nan", float("nan"): "another nan", math.inf: "inf", 10**30: "big", "\udc80": "surrogate"}
    out = roundtrip(obj)
    keys = list(out)
    assert math.copysign(1, keys[0]) == -1
    assert math.isnan(keys[1]) and math.isnan(keys[2])
    assert keys[3] == math.inf
    assert keys[4] == 10**30
    assert keys[5] == "\udc80"
    assert list(out.values()) == list(obj.values())


def test_empty_and_root_scalars():
    for obj in ([], (), {}, OrderedDict(), None, 3, "x"):
        assert same(roundtrip(obj), obj)


def test_max_depth_ok_and_over_limit():
    deep = []
    cur = deep
    for _ in range(MAX_DEPTH - 1):
        nxt = []
        cur.append(nxt)
        cur = nxt
    cur.append(torch.ones(2))
    out = roundtrip(deep)  # through JSON, so the container's json.loads copes too
    for _ in range(MAX_DEPTH - 1):
        out = out[0]
    assert torch.equal(out[0], torch.ones(2))

    too_deep = [deep]
    with pytest.raises(ValueError, match="MAX_DEPTH"):
        flatten(too_deep)


def test_self_reference_raises_with_path():
    a = [1, 2]
    a.append(a)
    with pytest.raises(ValueError, match=r"self-referencing.*obj\[2\]"):
        flatten(a)
    d = {"x": {"y": []}}
    d["x"]["y"].append(d)
    with pytest.raises(ValueError, match=r"obj\['x'\]\['y'\]\[0\]"):
        flatten(d)


def test_shared_container_is_written_twice_not_an_error():
    shared = [1, 2]
    out = roundtrip({"a": shared, "b": shared})
    assert out == {"a": [1, 2], "b": [1, 2]}


# --------------------------------------------------------------------------- #
# unsupported types
# --------------------------------------------------------------------------- #

Point = namedtuple("Point", "x y")


class Custom:
    pass


class SubTensor(torch.Tensor):
    pass


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize(
    "make, where, what",
    [
        (lambda: {"opt": {"state": [0, 1, 2, {Custom()}]}}, r"obj\['opt'\]\['state'\]\[3\]\[0\]", "Custom"),
        (lambda: {"c": Custom()}, r"obj\['c'\]", "Custom"),
        (lambda: {"d": defaultdict(lambda: 0)}, r"obj\['d'\]", "default_factory"),
        (lambda: {"p": Point(1, 2)}, r"obj\['p'\]", "Point"),
        (lambda: {"k": {(1, 2): 3}}, r"obj\['k'\]", "tuple"),
        (lambda: {"f": len}, r"obj\['f'\]", "builtin_function_or_method"),
        (lambda: {"s": np.str_("x")}, r"obj\['s'\]", "str_"),
        (lambda: {"a": np.array(["x"])}, r"obj\['a'\]", "dtype"),
        (lambda: {"a": np.array([1], dtype=object)}, r"obj\['a'\]", "dtype"),
        (lambda: {"a": np.zeros(2, dtype=np.longdouble)}, r"obj\['a'\]", "dtype"),
        (lambda: {"t": torch.zeros(2).as_subclass(SubTensor)}, r"obj\['t'\]", "subclass"),
        (lambda: {"t": torch.sparse_coo_tensor([[0]], [1.0], (2,))}, r"obj\['t'\]", "layout"),
        (lambda: {"t": torch.empty(2, device="meta")}, r"obj\['t'\]", "meta"),
        (lambda: {"t": torch.empty(2, dtype=torch.uint4)}, r"obj\['t'\]", "dtype"),
        (lambda: {"m": torch.nn.Linear(2, 2)}, r"obj\['m'\]", "Linear"),
    ],
)
def test_unsupported_types_raise_typeerror_with_path(make, where, what):
    obj = make()
    with pytest.raises(TypeError, match=where) as info:
        flatten(obj)
    assert what in str(info.value)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_quantized_tensor_rejected():
    q = torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.qint8)
    with pytest.raises(TypeError, match=r"quantized.*obj\['q'\]"):
        flatten({"q": q})


# --------------------------------------------------------------------------- #
# tensors
# --------------------------------------------------------------------------- #

STORABLE = sorted(tree._STORABLE)


def _sample(dtype, shape=(3, 4)):
    n = math.prod(shape)
    if dtype == torch.bool:  # other byte values are not valid bools
        return torch.randint(0, 2, shape, dtype=torch.uint8).bool()
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("name", STORABLE)
def test_every_storable_dtype_roundtrips_bitwise(name):
    dtype = tree._STORABLE[name]
    t = _sample(dtype)
    out = roundtrip({"t": t, "scalar": _sample(dtype, ()), "empty": _sample(dtype, (0, 3))})
    for k in ("t", "scalar", "empty"):
        assert out[k].dtype == dtype
    assert out["t"].shape == (3, 4)
    assert out["scalar"].shape == ()
    assert out["empty"].shape == (0, 3)
    assert _bytes_of(out["t"]) == _bytes_of(t)


def test_shapes_and_flags():
    p = torch.nn.Parameter(torch.randn(2, 3))
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    g = torch.randn(3, requires_grad=True)
    nonleaf = g * 2
    obj = {"p": p, "frozen": frozen, "g": g, "nonleaf": nonleaf, "empty": torch.empty(0, 5), "z": torch.tensor(3)}
    out = roundtrip(obj)
    assert type(out["p"]) is torch.nn.Parameter and out["p"].requires_grad
    assert type(out["frozen"]) is torch.nn.Parameter and not out["frozen"].requires_grad
    assert type(out["g"]) is torch.Tensor and out["g"].requires_grad and out["g"].is_leaf
    assert out["nonleaf"].requires_grad and out["nonleaf"].is_leaf
    assert torch.equal(out["nonleaf"], nonleaf.detach())
    assert out["empty"].shape == (0, 5)
    assert out["z"].shape == () and out["z"].item() == 3
    assert same(out["p"], p)


def test_same_tensor_object_comes_back_as_same_object():
    t = torch.randn(4)
    out = roundtrip({"a": t, "b": [t, (t,)]})
    assert out["a"] is out["b"][0] is out["b"][1][0]
    skel, entries = flatten({"a": t, "b": t})
    assert len(entries) == 1 and len(skel["tensors"]) == 1


def test_tied_weights_share_storage_after_roundtrip():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    sd = Tied().state_dict()
    assert sd["emb.weight"].data_ptr() == sd["head.weight"].data_ptr()
    skel, entries = flatten(sd)
    assert len(entries) == 1 and entries[0].name == "emb.weight"
    assert entries[0].tensor.numel() == 40
    out = roundtrip(sd)
    a, b = out["emb.weight"], out["head.weight"]
    assert a is not b
    assert a.data_ptr() == b.data_ptr()
    assert torch.equal(a, sd["emb.weight"])
    a[0, 0] = 1234.0
    assert b[0, 0].item() == 1234.0


def test_parameter_and_its_data_share():
    p = torch.nn.Parameter(torch.randn(3, 3))
    out = roundtrip({"p": p, "d": p.data})
    assert type(out["p"]) is torch.nn.Parameter and type(out["d"]) is torch.Tensor
    assert out["p"].data_ptr() == out["d"].data_ptr()


@pytest.mark.parametrize("order", ["parameter first", "data first"])
def test_two_whole_views_of_one_entry_keep_their_own_kind_and_grad(order):
    p = torch.nn.Parameter(torch.randn(3, 3))
    items = [("p", p), ("d", p.data), ("g", p.detach().requires_grad_(True))]
    obj = dict(items if order == "parameter first" else items[::-1])
    out = roundtrip(obj)
    assert type(out["p"]) is torch.nn.Parameter and out["p"].requires_grad
    assert type(out["d"]) is torch.Tensor and not out["d"].requires_grad and out["d"].grad_fn is None
    assert out["g"].requires_grad and out["g"].grad_fn is None
    assert len({id(v) for v in out.values()}) == 3
    assert out["p"].data_ptr() == out["d"].data_ptr() == out["g"].data_ptr()
    assert all(torch.equal(out[k].detach(), p.detach()) for k in out)


def test_overlapping_views_share_one_span():
    base = torch.arange(100.0)
    a = base[2:7]
    b = base[5:9]
    c = base[10:40].view(5, 6)[:, ::2]  # strided, overlaps nothing above
    skel, entries = flatten({"a": a, "b": b, "c": c})
    assert [e.tensor.numel() for e in entries] == [7, 15]  # span 2..9, c's own span
    out = roundtrip({"a": a, "b": b, "c": c})
    assert torch.equal(out["a"], a) and torch.equal(out["b"], b) and torch.equal(out["c"], c)
    assert out["c"].is_contiguous()  # a gappy view is stored (and comes back) compact
    out["a"][3] = -1.0  # base[5]
    assert out["b"][0].item() == -1.0


def test_interleaved_strided_views_and_whole():
    base = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    views = {"t": base.t(), "even": base.view(-1)[::2], "odd": base.view(-1)[1::2], "row": base[1]}
    skel, entries = flatten(views)
    assert len(entries) == 1 and entries[0].tensor.numel() == 12
    out = roundtrip(views)
    for k, v in views.items():
        assert torch.equal(out[k], v) and out[k].stride() == v.stride()
    out["row"][1] = 99  # base[1, 1] = flat 5 -> odd[2]
    assert out["odd"][2].item() == 99 and out["t"][1, 1].item() == 99


def test_slice_of_big_buffer_stores_only_the_slice():
    big = torch.arange(1_000_000, dtype=torch.float32)
    skel, entries = flatten({"s": big[10:20]})
    assert len(entries) == 1 and entries[0].tensor.numel() == 10
    # two disjoint slices of one buffer: two small entries, not the buffer
    skel, entries = flatten({"head": big[:10], "tail": big[-10:]})
    assert [e.tensor.numel() for e in entries] == [10, 10]
    # a gappy single view is stored as a contiguous copy of its elements
    sparse_view = big[::1000]
    skel, entries = flatten({"g": sparse_view})
    assert entries[0].tensor.numel() == 1000
    out = roundtrip({"g": sparse_view, "head": big[:10]})
    assert torch.equal(out["g"], sparse_view) and torch.equal(out["head"], big[:10])


def test_noncontiguous_single_views():
    x = torch.randn(5, 7)
    exp = torch.randn(3, 1).expand(3, 1000)
    obj = {"t": x.t(), "exp": exp, "perm": torch.randn(2, 3, 4).permute(2, 0, 1)}
    skel, entries = flatten(obj)
    assert [e.tensor.numel() for e in entries] == [35, 3, 24]
    out = roundtrip(obj)
    for k, v in obj.items():
        assert torch.equal(out[k], v)
        assert out[k].stride() == v.stride()  # layout kept when it costs nothing


def test_mixed_dtype_views_of_one_buffer():
    buf = torch.arange(32, dtype=torch.uint8)
    f = buf[4:12].view(torch.float32)  # byte 4..12, elements at float offset 1
    i64 = buf[16:32].view(torch.int64)
    u = buf[3:6]  # starts at an odd byte, overlaps f
    h = buf[10:20].view(torch.int16)  # overlaps f and i64
    obj = {"f": f, "u": u, "h": h, "i64": i64}
    skel, entries = flatten(obj)
    assert len(entries) == 1
    assert entries[0].tensor.dtype == torch.uint8
    assert entries[0].tensor.numel() == 32  # span 3..32 rounded down to 8-byte alignment
    for loader in (None, lambda t: torch.cat([torch.zeros(1, dtype=t.dtype), t])[1:]):
        out = roundtrip(obj, loader=loader)  # second loader: misaligned storage offset
        for k, v in obj.items():
            assert out[k].dtype == v.dtype and torch.equal(out[k], v), k
        out["u"][1] = 0xAB  # byte 4 = first byte of f[0]
        assert _bytes_of(out["f"])[0] == 0xAB
        out["h"][0] = -1  # bytes 10, 11 = last half of f[1]
        assert _bytes_of(out["f"])[6:8] == b"\xff\xff"
        out["i64"][0] = 0  # bytes 16..24 include h[3], h[4..]
        assert out["h"][3].item() == 0


def test_zero_size_and_conj_tensors():
    z = torch.randn(4, dtype=torch.complex64)
    obj = {"e": torch.empty(0), "e2": torch.empty(3, 0, 2, dtype=torch.int16), "conj": z.conj(), "neg": z._neg_view()}
    out = roundtrip(obj)
    assert out["e"].shape == (0,) and out["e2"].shape == (3, 0, 2) and out["e2"].dtype == torch.int16
    assert torch.equal(out["conj"], z.conj().resolve_conj())
    assert torch.equal(out["neg"], -z)


def test_device_is_recorded_not_moved():
    skel, entries = flatten({"t": torch.ones(2)})
    assert skel["tensors"][0]["device"] == "cpu"
    for device in ("cuda:1", "xpu", "some_future_backend:3"):  # as written elsewhere
        skel["tensors"][0]["device"] = device
        validate(skel, 1)
        out = unflatten(skel, lambda i: entries[i].tensor.clone())
        assert out["t"].device.type == "cpu"


def test_get_tensor_may_return_flat_data():
    obj = {"w": torch.randn(3, 4), "v": torch.randn(2, 2).t()}
    out = roundtrip(obj, loader=lambda t: t.reshape(-1).clone())
    assert torch.equal(out["w"], obj["w"]) and torch.equal(out["v"], obj["v"])


def test_get_tensor_returning_wrong_data_is_formaterror():
    skel, entries = flatten({"w": torch.randn(3, 4)})
    with pytest.raises(FormatError, match="skeleton says"):
        unflatten(skel, lambda i: torch.zeros(11))
    with pytest.raises(FormatError, match="skeleton says"):
        unflatten(skel, lambda i: torch.zeros(12, dtype=torch.float64))
    with pytest.raises(FormatError, match="not a tensor"):
        unflatten(skel, lambda i: [0.0] * 12)


# --------------------------------------------------------------------------- #
# names and order
# --------------------------------------------------------------------------- #


def test_entry_names_order_and_collisions():
    t1, t2, t3 = torch.ones(1), torch.ones(2), torch.ones(3)
    obj = {"a.b": t1, "a": {"b": t2}, "l": [t3, {7: t1}], "\ud800x": torch.ones(4)}
    skel, entries = flatten(obj)
    names = [e.name for e in entries]
    assert names == ["a.b", "a.b#2", "l.0", "\\ud800x"]
    assert tensor_paths(skel) == names
    assert tensor_paths(skeleton_from_json(skeleton_to_json(skel))) == names
    assert flatten(torch.ones(1))[1][0].name == "<root>"
    # deterministic
    assert skeleton_to_json(flatten(obj)[0]) == skeleton_to_json(skel)


def test_entry_order_is_first_appearance():
    big = torch.arange(10.0)
    obj = {"x": torch.ones(1), "late_view": big[5:], "y": torch.ones(2), "early_later": big[:6]}
    skel, entries = flatten(obj)
    assert [e.name for e in entries] == ["x", "late_view", "y"]
    assert entries[1].tensor.numel() == 10  # the two overlapping views share one span


# --------------------------------------------------------------------------- #
# real-world objects
# --------------------------------------------------------------------------- #


def _model_and_opt(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    return model, opt


def _step(model, opt, seed):
    torch.manual_seed(seed)
    opt.zero_grad()
    model(torch.randn(16, 4)).pow(2).sum().backward()
    opt.step()


def test_adamw_state_dict_roundtrip_and_resume():
    model, opt = _model_and_opt(0)
    _step(model, opt, 1)
    osd = opt.state_dict()
    out = roundtrip(osd)
    assert same(out, osd)
    assert list(out["state"]) == [0, 1, 2, 3]
    assert out["param_groups"][0]["betas"] == (0.9, 0.95)
    assert type(out["param_groups"][0]["betas"]) is tuple

    # resuming from the round-tripped state gives the same next step
    model2, opt2 = _model_and_opt(0)
    model2.load_state_dict(roundtrip(model.state_dict()))
    opt2.load_state_dict(out)
    _step(model, opt, 2)
    _step(model2, opt2, 2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_training_checkpoint_with_rng_states():
    model, opt = _model_and_opt(3)
    _step(model, opt, 4)
    np.random.seed(5)
    np.random.rand(3)
    gen = np.random.default_rng(11)
    gen.random(2)
    random.seed(6)
    ckpt = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 3,
        "step": 12345,
        "best": float("inf"),
        "config": {"lr": 1e-3, "dtype": torch.bfloat16, "device": torch.device("cpu"), "layers": (4, 8, 2)},
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "numpy_gen": gen.bit_generator.state,
            "python": random.getstate(),
        },
    }
    out = roundtrip(ckpt)
    assert same(out, ckpt)

    torch.set_rng_state(out["rng"]["torch"])
    a = torch.rand(3)
    torch.set_rng_state(ckpt["rng"]["torch"])
    assert torch.equal(a, torch.rand(3))

    np_state = out["rng"]["numpy"]
    assert type(np_state) is tuple and type(np_state[1]) is np.ndarray and np_state[1].dtype == np.uint32
    np.random.set_state(np_state)
    x = np.random.rand(4)
    np.random.set_state(ckpt["rng"]["numpy"])
    assert np.array_equal(x, np.random.rand(4))

    g2 = np.random.default_rng()
    g2.bit_generator.state = out["rng"]["numpy_gen"]
    assert np.array_equal(g2.random(3), gen.random(3))

    random.setstate(out["rng"]["python"])
    y = [random.random() for _ in range(3)]
    random.setstate(ckpt["rng"]["python"])
    assert y == [random.random() for _ in range(3)]


@pytest.mark.parametrize("dtype", tree._NP_NAMES)
def test_numpy_arrays_and_scalars(dtype):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 100, size=(3, 5)).astype(dtype)
    obj = {
        "arr": arr,
        "zero_d": np.array(arr[0, 0]),
        "empty": np.zeros((0, 2), dtype=dtype),
        "strided": arr[:, ::2],
        "scalar": arr[1, 1],
        "big_endian": arr.astype(np.dtype(dtype).newbyteorder(">")),
    }
    out = roundtrip(obj)
    for k in ("arr", "zero_d", "empty", "strided"):
        assert type(out[k]) is np.ndarray and out[k].dtype == np.dtype(dtype)
        assert out[k].shape == obj[k].shape and np.array_equal(out[k], obj[k]), k
    assert type(out["scalar"]) is type(obj["scalar"]) and out["scalar"] == obj["scalar"]
    assert out["big_endian"].dtype == np.dtype(dtype)  # comes back in native byte order
    assert np.array_equal(out["big_endian"], obj["big_endian"])


def test_numpy_scalar_special_values():
    vals = [
        np.float32(-0.0), np.float16(np.inf), np.float64(np.nan), np.uint64(2**64 - 1),
        np.int64(-(2**63)), np.bool_(True), np.complex64(complex(1.5, -2)), np.complex128(complex(np.nan, 0)),
    ]
    out = roundtrip(vals)
    assert same(out, vals)


def test_same_ndarray_object_comes_back_identical():
    a = np.arange(4)
    out = roundtrip([a, a])
    assert out[0] is out[1]


# --------------------------------------------------------------------------- #
# malformed skeletons
# --------------------------------------------------------------------------- #


def _with_root(root, tensors=None, entries=None):
    return {
        "format": tree.FORMAT_NAME,
        "version": 1,
        "root": root,
        "tensors": [] if tensors is None else tensors,
        "entries": [] if entries is None else entries,
    }


def _rec(**kw):
    r = {
        "entry": 0, "dtype": "float32", "offset": 0, "shape": [2, 3], "stride": [3, 1],
        "device": "cpu", "requires_grad": False, "kind": "tensor",
    }
    r.update(kw)
    return r


_ENT = {"name": "w", "dtype": "float32", "shape": [2, 3]}

BAD_ROOTS = [
    ["nosuchtag"],
    ["List", 1],
    [],
    [1, 2],
    {"dict": []},
    ["int"],
    ["int", 5],
    ["int", "01"],
    ["int", "1e5"],
    ["int", " 1"],
    ["int", "0X1F"],
    ["int", "1" * 4001],
    ["float", "NaN"],
    ["float", 1.0],
    ["float", "nan", "extra"],
    ["complex", 1.0],
    ["complex", "a", 1.0],
    ["str", "!!!"],
    ["str", "/w=="],  # base64 of b"\xff": not UTF-8
    ["bytes", "abc"],
    ["bytes", 12],
    ["bytearray"],
    ["dtype", "nonexistent"],
    ["dtype", "__class__"],
    ["dtype", "Float32"],
    ["device", "bogus:x"],
    ["device", 3],
    ["size", 1.5],
    ["size", True],
    ["size", 2**63],
    ["tensor", 0],
    ["tensor", -1],
    ["tensor", True],
    ["tensor", "0"],
    ["dict", "a"],
    ["dict", ["list"], 1],
    ["dict", ["tuple"], 1],
    ["dict", {"a": 1}, 1],
    ["dict", "a", 1, "a", 2],
    ["odict", 1, "x", True, "y"],
    ["dict", 1, "x", 1.0, "y"],
    ["npscalar", "uint8", 300],
    ["npscalar", "object", 1],
    ["npscalar", "float32", "x"],
    ["npscalar", "bool", 1],
    ["npscalar", "complex64", 1.0],
    ["list", ["list", ["bogus"]]],
    ["tuple", 1, {"x": 1}],
]


@pytest.mark.parametrize("root", BAD_ROOTS, ids=lambda r: json.dumps(r)[:40])
def test_malformed_root_nodes(root):
    skel = _with_root(root)
    with pytest.raises(FormatError):
        validate(skel, 0)
    with pytest.raises(FormatError):
        unflatten(skel, lambda i: pytest.fail("must not load data"))


BAD_TABLES = [
    ("entry out of range", [_rec(entry=1)], [_ENT]),
    ("entry negative", [_rec(entry=-1)], [_ENT]),
    ("entry is bool", [_rec(entry=False)], [_ENT]),
    ("offset past end", [_rec(offset=1)], [_ENT]),
    ("offset huge", [_rec(offset=2**70)], [_ENT]),
    ("stride negative", [_rec(stride=[-3, 1])], [_ENT]),
    ("stride too big", [_rec(stride=[4, 1])], [_ENT]),
    ("stride overflow", [_rec(shape=[3], stride=[2**61])], [_ENT]),
    ("shape too big", [_rec(shape=[2, 4])], [_ENT]),
    ("shape float", [_rec(shape=[2.0, 3])], [_ENT]),
    ("shape/stride length", [_rec(stride=[3])], [_ENT]),
    ("too many dims", [_rec(shape=[1] * 65, stride=[1] * 65)], [_ENT]),
    ("dtype mismatch", [_rec(dtype="int32")], [_ENT]),
    ("wider view", [_rec(dtype="float64", shape=[3], stride=[1])], [_ENT]),
    ("bad dtype", [_rec(dtype="qint8")], [_ENT]),
    ("grad on int", [_rec(dtype="int64", shape=[1], stride=[1], requires_grad=True)],
     [{"name": "w", "dtype": "int64", "shape": [1]}]),
    ("requires_grad not bool", [_rec(requires_grad=0)], [_ENT]),
    ("bad kind", [_rec(kind="module")], [_ENT]),
    ("ndarray without np_dtype", [_rec(kind="ndarray")], [_ENT]),
    ("np_dtype mismatch", [_rec(kind="ndarray", np_dtype="int32")], [_ENT]),
    ("np_dtype on tensor", [_rec(np_dtype="float32")], [_ENT]),
    ("extra member", [_rec(extra=1)], [_ENT]),
    ("missing member", [{k: v for k, v in _rec().items() if k != "stride"}], [_ENT]),
    ("bad device", [_rec(device="no pe")], [_ENT]),
    ("device not str", [_rec(device=0)], [_ENT]),
    ("record not object", [[0]], [_ENT]),
    ("duplicate names", [], [_ENT, _ENT]),
    ("entry bad dtype", [], [{"name": "w", "dtype": "uint4", "shape": [2]}]),
    ("entry negative shape", [], [{"name": "w", "dtype": "uint8", "shape": [-1]}]),
    ("entry name not str", [], [{"name": 1, "dtype": "uint8", "shape": [1]}]),
    ("entry name too long", [], [{"name": "x" * 5000, "dtype": "uint8", "shape": [1]}]),
    ("entry extra member", [], [{"name": "w", "dtype": "uint8", "shape": [1], "x": 0}]),
    ("entry huge", [], [{"name": "w", "dtype": "float64", "shape": [2**40, 2**40]}]),
]


@pytest.mark.parametrize("what, tensors, entries", BAD_TABLES, ids=[b[0] for b in BAD_TABLES])
def test_malformed_tables(what, tensors, entries):
    root = ["tensor", 0] if tensors else None
    skel = _with_root(root, tensors, entries)
    with pytest.raises(FormatError):
        validate(skel, len(entries))
    with pytest.raises(FormatError):
        unflatten(skel, lambda i: torch.zeros(6))


def test_malformed_top_level():
    skel, entries = valid_skeleton()
    validate(skel, len(entries))
    cases = [None, [], "x", {**skel, "extra": 1}, {k: v for k, v in skel.items() if k != "root"},
             {**skel, "format": "other"}, {**skel, "version": "1"}, {**skel, "version": 0},
             {**skel, "version": True}, {**skel, "tensors": {}}, {**skel, "entries": None}]
    for bad in cases:
        with pytest.raises(FormatError):
            validate(bad, len(entries))
        with pytest.raises(FormatError):
            unflatten(bad, lambda i: entries[i].tensor)
    with pytest.raises(UnsupportedVersionError):
        validate({**skel, "version": 2}, len(entries))
    with pytest.raises(FormatError, match="container holds"):
        validate(skel, len(entries) + 1)
    with pytest.raises(FormatError):
        tensor_paths({**skel, "entries": [{"name": 1}]})


def test_million_deep_skeleton_is_formaterror_not_recursion():
    root = ["list"]
    cur = root
    for _ in range(1_000_000):
        nxt = ["list"]
        cur.append(nxt)
        cur = nxt
    skel = _with_root(root)
    with pytest.raises(FormatError, match="MAX_DEPTH"):
        validate(skel, 0)
    with pytest.raises(FormatError, match="MAX_DEPTH"):
        unflatten(skel, lambda i: None)
    # one past the limit, made of dicts
    root = ["dict"]
    cur = root
    for _ in range(MAX_DEPTH):
        nxt = ["dict"]
        cur += ["k", nxt]
        cur = nxt
    with pytest.raises(FormatError, match="MAX_DEPTH"):
        validate(_with_root(root), 0)


def test_string_limits(monkeypatch):
    monkeypatch.setattr(tree, "MAX_STR_LEN", 8)
    with pytest.raises(FormatError):
        validate(_with_root("x" * 9), 0)
    with pytest.raises(FormatError):
        validate(_with_root(["bytes", "AAAAAAAAAAAA"]), 0)
    validate(_with_root("x" * 8), 0)
    with pytest.raises(ValueError, match="MAX_STR_LEN"):
        flatten({"s": "y" * 9})
    with pytest.raises(ValueError, match="limit"):
        flatten({"b": b"y" * 9})


def test_skeleton_from_json_rejects_bad_json():
    good = skeleton_to_json(valid_skeleton()[0])
    assert skeleton_from_json(good) == skeleton_from_json(good.decode("utf-8"))
    bad = [
        b"\xff\xfe",
        b"{",
        b"[]",
        b'{"a":NaN}',
        b'{"a":Infinity}',
        b'{"a":1,"a":2}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' + b"1" * 5000 + b"}",
    ]
    for data in bad:
        with pytest.raises(FormatError):
            skeleton_from_json(data)


def test_random_corruption_only_raises_formaterror():
    """Mutate a valid skeleton at random: the result is either accepted or a
    FormatError, never any other exception."""
    t = torch.arange(12.0)
    obj = {
        "model": OrderedDict([("w", t.view(3, 4)), ("b", t[4:8]), ("p", torch.nn.Parameter(torch.ones(2)))]),
        "step": 3, "lr": 0.5, "big": 2**70, "betas": (0.9, 0.99), "raw": b"xy", "s": "\ud800",
        "np": np.arange(3, dtype=np.uint16), "nps": np.float32(2.5), "dt": torch.int8, "dev": torch.device("cpu"),
        "mixed": [t.view(torch.int32)[1:3], t[2:5]],
    }
    skel, entries = flatten(obj)
    base = json.loads(skeleton_to_json(skel))
    replacements = [None, True, -1, 0, 1, 2**64, 0.5, "", "x", "float32", "tensor", "list", "dict",
                    [], ["list"], ["tensor", 0], ["int", "x"], {}, {"a": 1}, [1] * 3]
    rng = random.Random(1234)

    def containers(node, acc):
        stack = [node]
        while stack:
            n = stack.pop()
            if isinstance(n, list):
                acc.append(n)
                stack.extend(n)
            elif isinstance(n, dict):
                acc.append(n)
                stack.extend(n.values())
        return acc

    for _ in range(400):
        skel2 = copy.deepcopy(base)
        spots = containers(skel2, [])
        for _ in range(rng.randint(1, 3)):
            c = rng.choice(spots)
            if isinstance(c, list):
                if not c:
                    continue
                c[rng.randrange(len(c))] = copy.deepcopy(rng.choice(replacements))
            else:
                c[rng.choice(list(c))] = copy.deepcopy(rng.choice(replacements))
        try:
            validate(skel2, len(entries))
            unflatten(skel2, lambda i: entries[i].tensor.clone())
        except FormatError:
            pass


# --------------------------------------------------------------------------- #
# property test
# --------------------------------------------------------------------------- #

_chars = st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"])
_text = st.text(_chars, max_size=12)
_keys = st.none() | st.booleans() | st.integers() | st.floats() | _text
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**300), max_value=2**300)
    | st.floats()
    | st.complex_numbers()
    | _text
    | st.binary(max_size=16)
    | st.binary(max_size=16).map(bytearray)
    | st.sampled_from(sorted(tree._ALL_DTYPES)).map(lambda n: tree._ALL_DTYPES[n])
    | st.sampled_from(["cpu", "cuda:3", "meta"]).map(torch.device)
    | st.lists(st.integers(0, 9), max_size=4).map(torch.Size)
)
_trees = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.lists(children, max_size=5).map(tuple)
        | st.dictionaries(_keys, children, max_size=5)
        | st.dictionaries(_keys, children, max_size=5).map(lambda d: OrderedDict(d))
    ),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None)
@given(_trees)
def test_property_nested_scalars_roundtrip(obj):
    skel, entries = flatten(obj)
    assert entries == []
    out = roundtrip(obj)
    assert same(out, obj)


# --------------------------------------------------------------------------- #
# CUDA (runs only where a GPU is present)
# --------------------------------------------------------------------------- #


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_store_on_cpu_and_rebuild_on_the_loaders_device():
    dev = torch.device("cuda:0")
    emb = torch.nn.Parameter(torch.randn(10, 4, device=dev))
    buf = torch.arange(64, dtype=torch.uint8, device=dev)
    obj = {
        "emb": emb,
        "head": emb.data,  # tied, different object
        "t": torch.randn(6, 5, device=dev).t(),
        "slice": torch.randn(1000, device=dev)[10:20],
        "f": buf[4:12].view(torch.float32),
        "u": buf[3:6],
        "bf16": torch.randn(3, device=dev, dtype=torch.bfloat16),
        "dev": dev,
    }
    skel, entries = flatten(obj)
    assert all(e.tensor.device.type == "cpu" for e in entries)
    assert {r["device"] for r in skel["tensors"]} == {"cuda:0"}
    assert [e.tensor.numel() for e in entries] == [40, 30, 10, 12, 3]  # f+u: bytes 0..12 (aligned)

    skel = skeleton_from_json(skeleton_to_json(skel))
    out = unflatten(skel, lambda i: entries[i].tensor.to(dev))
    assert type(out["emb"]) is torch.nn.Parameter and out["emb"].device == dev
    assert out["emb"].data_ptr() == out["head"].data_ptr()
    for k in ("emb", "head", "t", "slice", "f", "u", "bf16"):
        assert out[k].device == dev and torch.equal(out[k].cpu(), obj[k].detach().cpu()), k
    assert out["t"].stride() == obj["t"].stride()
    out["u"][1] = 7
    assert out["f"].view(torch.uint8)[0].item() == 7
    assert out["dev"] == dev

    # map_location="cpu": the loader hands back CPU tensors and views follow them
    out_cpu = unflatten(skel, lambda i: entries[i].tensor.clone())
    assert out_cpu["emb"].device.type == "cpu"
    assert out_cpu["emb"].data_ptr() == out_cpu["head"].data_ptr()
