"""Property-based tests over the format (issue 8), with hypothesis.

1. Any object tree that ``save`` accepts round-trips: same types, same
   values bit for bit (NaN payloads of tensors included), same container
   order, tied tensors still one object.
2. Any mutation of a valid file (bytes flipped or smashed, the file cut, index
   fields changed, sizes swapped, records rewritten, section bytes replaced
   behind valid checksums, the footer dropped; see ``fuzz/craft.py``) gives
   a result or a :class:`~torch_dtdr.errors.DTDRError`, never another
   exception, within a CPU-time and a memory budget (peak RSS through
   /proc/self/clear_refs where Linux allows it).

Reproducible: ``derandomize=True``; every mutation is a pure function of its
drawn integers, so a failure prints everything needed to rebuild the file.
"""

from __future__ import annotations

import glob
import io
import math
import os
import random
import re
import signal
import sys
import time
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from torch_dtdr import api
from torch_dtdr.errors import DamageWarning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fuzz import craft  # noqa: E402

SETTINGS = dict(derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CPU_BUDGET_S = 5.0  # per mutated file (load + open); hostile files are held to 1 s in test_hostile.py
MEMORY_BUDGET_MB = 100.0


# --------------------------------------------------------------------------- object trees

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
           torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn, torch.uint16]


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(_DTYPES))
    shape = draw(st.lists(st.integers(0, 6), max_size=3))
    n = math.prod(shape)
    seed = draw(st.integers(0, 2 ** 31))
    g = torch.Generator().manual_seed(seed)
    nbytes = n * dtype.itemsize
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        t = (raw % 2).bool()
    elif draw(st.booleans()) and dtype.is_floating_point:
        t = torch.randn(n, generator=g).to(dtype)  # ordinary values: the codec's main path
    else:
        t = raw.view(dtype) if nbytes else torch.empty(0, dtype=dtype)  # arbitrary bits: NaN payloads, inf, -0
    t = t.reshape(shape)
    how = draw(st.sampled_from(["plain", "transpose", "slice", "param"]))
    if how == "transpose" and t.dim() >= 2:
        t = t.transpose(0, 1)
    elif how == "slice" and t.dim() >= 1 and t.shape[0] > 1:
        t = t[1:]
    elif how == "param" and dtype.is_floating_point:
        t = torch.nn.Parameter(t, requires_grad=draw(st.booleans()))
    return t


_SURROGATES = st.sampled_from(["\udc80", "a\ud800b", "\udfff"])
_text = st.one_of(st.text(max_size=12), _SURROGATES)
_keys = st.one_of(_text, st.integers(-(2 ** 70), 2 ** 70), st.none(), st.booleans(),
                  st.floats(allow_nan=False, allow_infinity=True))
_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2 ** 100), 2 ** 100), st.floats(allow_nan=True, allow_infinity=True),
    st.complex_numbers(allow_nan=True, allow_infinity=True), _text, st.binary(max_size=16),
    st.binary(max_size=8).map(bytearray), st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool]),
    st.lists(st.integers(0, 9), max_size=3).map(torch.Size), st.just(torch.device("cpu")),
    st.sampled_from([np.float32(1.5), np.int64(-3), np.bool_(True), np.complex64(1 - 2j), np.uint8(255)]),
    tensors(),
    st.lists(st.integers(-5, 5), max_size=6).map(lambda v: np.array(v, dtype=np.int16)),
)


def _trees():
    return st.recursive(
        _leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.lists(inner, max_size=4).map(tuple),
            st.dictionaries(_keys, inner, max_size=4),
            st.dictionaries(_keys, inner, max_size=3).map(OrderedDict),
        ),
        max_leaves=12,
    )


def _same(a, b, path="obj") -> None:
    assert type(a) is type(b), f"{path}: {type(a).__name__} became {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.requires_grad) == (b.dtype, b.shape, b.requires_grad), path
        if a.numel():
            ab = a.detach().contiguous().reshape(-1).view(torch.uint8)
            bb = b.detach().contiguous().reshape(-1).view(torch.uint8)
            if a.dtype == torch.bool:
                ab, bb = a.reshape(-1).to(torch.uint8), b.reshape(-1).to(torch.uint8)
            assert torch.equal(ab, bb), f"{path}: tensor bits differ"
    elif isinstance(a, np.ndarray):
        assert (a.dtype, a.shape) == (b.dtype, b.shape) and a.tobytes() == b.tobytes(), path
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b)), path
    elif isinstance(a, complex):
        _same(a.real, b.real, path + ".real")
        _same(a.imag, b.imag, path + ".imag")
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), path
    elif isinstance(a, dict):
        assert len(a) == len(b), path
        for (ka, va), (kb, vb) in zip(a.items(), b.items()):
            _same(ka, kb, f"{path}[key {ka!r}]")
            _same(va, vb, f"{path}[{ka!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _tensor_ids(obj, out):
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return out


@settings(max_examples=150, **SETTINGS)
@given(obj=_trees(), codec=st.sampled_from(["dtdr", "raw"]), parity=st.sampled_from(["off", (4, 1), "default"]),
       segment=st.sampled_from([7, 64, 1 << 20]), tie=st.booleans())
def test_accepted_trees_round_trip(obj, codec, parity, segment, tie):
    if tie and isinstance(obj, (list, dict)):
        shared = torch.arange(6.0)
        obj = {"a": shared, "b": [shared, shared[2:]], "rest": obj}
    try:
        data = craft.save_bytes(obj, codec=codec, parity=parity, segment_elems=segment)
    except (TypeError, ValueError) as e:  # save refuses what it cannot hold: fine, but count it
        event(f"save refused: {type(e).__name__}: {str(e)[:60]}")
        return
    event("saved")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DamageWarning)
        back, rep = api.load(io.BytesIO(data), errors="strict", report=True)
    assert rep.status == "exact"
    _same(obj, back)
    if tie and isinstance(back, dict) and "a" in back:
        assert back["b"][0] is back["a"]
        assert back["b"][1].untyped_storage().data_ptr() == back["a"].untyped_storage().data_ptr()
    # the lazy reader agrees
    import torch_dtdr

    with torch_dtdr.open(io.BytesIO(data)) as f:
        for k in f.keys():
            f.get_tensor(k)


# --------------------------------------------------------------------------- mutations


def _status(key):
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024 if m else None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status("VmHWM") is not None
    except OSError:
        return False


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang("a load ran for more than 30 s of wall time")


def check_hostile(data: bytes, what: str) -> None:
    """Load ``data`` both ways: a result or DTDRErrors only, within budget."""
    measure = _reset_peak()
    rss0 = _status("VmRSS") if measure else None
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 30)
    t0 = time.process_time()
    try:
        craft.exercise(data)  # DTDRErrors are returned; anything else propagates and fails the test
    except _Hang:
        pytest.fail(f"{what}: hang")
    except Exception as e:
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"dtdr-finding-{abs(hash(data)):x}.bin")
        with open(path, "wb") as f:
            f.write(data)
        raise AssertionError(f"{what}: {type(e).__name__} (not a DTDRError): {e}; input saved to {path}") from e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    cpu = time.process_time() - t0
    assert cpu < CPU_BUDGET_S, f"{what}: {cpu:.1f} s of CPU"
    if measure:
        peak = (_status("VmHWM") - rss0) / (1 << 20)
        assert peak < MEMORY_BUDGET_MB, f"{what}: peak {peak:.0f} MB above the baseline"


_SEEDS: list[bytes] = []


def _seed_files() -> list[bytes]:
    if not _SEEDS:
        _SEEDS.extend(craft.seed_files())
        for path in sorted(glob.glob(os.path.join(ROOT, "tests", "data", "golden_v1_*.dtdr"))):
            if os.path.getsize(path) <= 1 << 20:
                with open(path, "rb") as f:
                    _SEEDS.append(f.read())
    return _SEEDS


_NAMES = sorted(craft.MUTATIONS)


@settings(max_examples=250, **SETTINGS)
@given(base=st.integers(0, 1000), name=st.sampled_from(_NAMES), seed=st.integers(0, 2 ** 32 - 1))
def test_mutated_files_give_result_or_typed_error(base, name, seed):
    seeds = _seed_files()
    src = seeds[base % len(seeds)]
    data = craft.MUTATIONS[name](src, random.Random(seed))
    check_hostile(data, f"mutation {name!r} of seed file {base % len(seeds)} with Random({seed})")


@settings(max_examples=100, **SETTINGS)
@given(obj=_trees(), name=st.sampled_from(_NAMES), seed=st.integers(0, 2 ** 32 - 1),
       codec=st.sampled_from(["dtdr", "raw", "dtdr8"]))
def test_mutations_of_generated_files(obj, name, seed, codec):
    try:
        data = craft.save_bytes({"obj": obj, "w": torch.randn(300)}, codec=codec, parity=(4, 1), segment_elems=100)
    except (TypeError, ValueError):
        return
    check_hostile(craft.MUTATIONS[name](data, random.Random(seed)), f"mutation {name!r} with Random({seed})")


@settings(max_examples=60, **SETTINGS)
@given(data=st.binary(max_size=2048), prefix=st.booleans())
def test_arbitrary_bytes(data, prefix):
    """Raw bytes, optionally behind the magic (the record scan then runs on them)."""
    check_hostile((b"\x89DTDR\r\n\x1a" + data) if prefix else data, "arbitrary bytes")


@settings(max_examples=60, **SETTINGS)
@given(doc=st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.text(max_size=6),
                                  st.floats(allow_nan=False)),
                        lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                st.dictionaries(st.sampled_from(
                                                    ["format", "tensors", "records", "shape", "name", "dtype",
                                                     "codec", "tree", "geometry", "stream_length", "metadata",
                                                     "segment_elems", "root", "entries", "x"]), inner, max_size=5)),
                        max_leaves=25),
       keep=st.sets(st.sampled_from(["format", "tree", "tensors", "metadata", "geometry", "stream_length"])))
def test_arbitrary_index_documents(doc, keep):
    """Any JSON document as the footer index (valid hashes): a typed error or a load."""
    seeds = _seed_files()
    base = craft.parse(seeds[0]).index
    if isinstance(doc, dict):
        doc = dict(doc, **{k: base[k] for k in keep})
    check_hostile(craft.reseal(seeds[0], doc), "arbitrary index document")
