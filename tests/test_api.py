"""save / load / open / verify / repair through the public API."""

from __future__ import annotations

import collections
import io
import os
import warnings

import pytest
import torch

import torch_dtdr
import torch_dtdr.api
from torch_dtdr.errors import (
    CheckpointNotFoundError,
    DamageWarning,
    DTDRError,
    FormatError,
    IntegrityError,
    TruncatedError,
)
from torch_dtdr.format.reader import regions

from .helpers import assert_same, llm_state_dict, pseudo, zero_range

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def all_dtypes():
    names = ["float64", "float32", "float16", "bfloat16", "complex64", "complex128", "float8_e4m3fn",
             "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "int8", "int16", "int32", "int64",
             "uint8", "uint16", "uint32", "uint64", "bool"]
    return [getattr(torch, n) for n in names if hasattr(torch, n)]


def make(dtype, n=100):
    base = pseudo(n, torch.float64, 7, 3.0)
    if dtype == torch.bool:
        return base > 0
    if dtype.is_complex:
        return torch.complex(base, -base).to(dtype)
    if dtype.is_floating_point:
        return base.to(torch.float32).to(dtype)
    return (base * 40).round().clamp(0 if not dtype.is_signed else -100, 100).to(dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (3,), (1023,), (1025,), (7, 300), (2, 0, 3)])
def test_lossless_roundtrip_floats(tmp_path, dtype, shape):
    n = 1
    for d in shape:
        n *= d
    x = pseudo(n, torch.float32, 3, 0.5).to(dtype).reshape(shape)
    p = tmp_path / "t.dtdr"
    torch_dtdr.save({"x": x}, p)
    assert_same(torch_dtdr.load(p)["x"], x)


@pytest.mark.parametrize("dtype", all_dtypes(), ids=str)
def test_every_dtype_roundtrips(tmp_path, dtype):
    x = make(dtype)
    p = tmp_path / "t.dtdr"
    torch_dtdr.save(x, p)
    assert_same(torch_dtdr.load(p), x)


def test_special_values_survive_lossless(tmp_path):
    x = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, 3.4e38, -1.0] * 200)
    for dtype in FLOATS:
        y = x.to(dtype)
        torch_dtdr.save(y, tmp_path / "s.dtdr")
        assert_same(torch_dtdr.load(tmp_path / "s.dtdr"), y)


def test_multi_segment_tensor(tmp_path):
    x = pseudo(300_000, torch.float16, 9)
    torch_dtdr.save({"x": x}, tmp_path / "m.dtdr", segment_elems=65536)
    assert_same(torch_dtdr.load(tmp_path / "m.dtdr")["x"], x)


def test_thread_pools_change_nothing_but_speed(tmp_path, monkeypatch):
    """Parallel encode, parallel tensor decode and threaded residual frames
    (which machines with more cores use by default) give the same bytes and
    the same tensors as the serial paths."""
    from torch_dtdr.codecs import _residual as R

    sd = {f"w{i}": pseudo(70_000 + 4096 * i, torch.float32, i) for i in range(5)}
    sd["big"] = pseudo(1_500_000, torch.bfloat16, 9)  # two segments, many residual frames
    sd.update({f"small{i}": pseudo(300 + 7 * i, torch.float16, i) for i in range(6)})  # encoded by the writer
    serial, parallel = tmp_path / "serial.dtdr", tmp_path / "parallel.dtdr"
    torch_dtdr.save(sd, serial, workers=1)
    torch_dtdr.save(sd, parallel, workers=3)
    assert serial.read_bytes() == parallel.read_bytes()
    monkeypatch.setattr(torch_dtdr.api, "DEFAULT_WORKERS", 3)
    monkeypatch.setattr(R, "DECODE_THREADS", 2)
    for k, v in torch_dtdr.load(serial, errors="strict").items():
        assert_same(v, sd[k])
    with torch_dtdr.open(serial) as f:  # one tensor alone: its frames on two threads
        assert_same(f.get_tensor("big"), sd["big"])
    # damage repaired by parity under the parallel paths as well
    zero_range(parallel, 8192, 4096)
    with pytest.warns(DamageWarning):
        back, rep = torch_dtdr.load(parallel, report=True)
    assert rep.status == "repaired"
    for k, v in back.items():
        assert_same(v, sd[k])


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_small_tensors_decoded_inline_and_big_ones_on_workers_land_in_their_places(tmp_path, workers):
    """Small tensors are decoded on the calling thread and big ones on the workers (INLINE_BYTES);
    interleaved, every tensor still lands under its own name and in its report slot."""
    from torch_dtdr import decoding

    small = decoding.INLINE_BYTES // 16
    sd = {f"t{i}": pseudo(small if i % 3 else 8 * decoding.INLINE_BYTES, torch.float32, i) for i in range(10)}
    sd["scalar"] = torch.tensor(7.0)
    path = tmp_path / "mixed.dtdr"
    torch_dtdr.save(sd, path)
    back, rep = torch_dtdr.load(path, workers=workers, report=True, errors="strict")
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert_same(back[k], v)
    assert [t.name for t in rep.tensors] == list(sd)


def test_an_interrupted_load_does_not_decode_the_rest_first(tmp_path):
    """Ctrl-C (or any failure) on the calling thread cancels the big tensors still queued for the workers
    instead of waiting for all of them to decode."""
    import threading
    import time

    from torch_dtdr import decoding

    sd = {f"big{i}": torch.zeros(decoding.INLINE_BYTES // 2) for i in range(40)}
    sd["small"] = torch.zeros(4)
    path = tmp_path / "m.dtdr"
    torch_dtdr.save(sd, path, codec="raw")
    on_workers = []

    def location(storage, _tag):
        if threading.current_thread() is threading.main_thread():
            raise KeyboardInterrupt
        on_workers.append(1)
        time.sleep(0.05)
        return storage

    with pytest.raises(KeyboardInterrupt):
        torch_dtdr.load(path, map_location=location, workers=2)
    assert len(on_workers) < 20, len(on_workers)


@pytest.mark.parametrize("stripe_kind", ["full", "last, short"])
def test_scattered_byte_errors_in_many_chunks_of_a_stripe_are_repaired(tmp_path, stripe_kind):
    """Default parity (32 + 2) erases at most 2 chunks per stripe, but byte
    errors that hit distinct byte columns are located by the code itself:
    here 12 chunks of one stripe (data and parity) each take 3 wrong bytes."""
    from torch_dtdr.format.reader import ContainerReader
    from torch_dtdr.storage import open_source

    n = 600_000 if stripe_kind == "full" else 20_000
    sd = {"w": pseudo(n, torch.float32, 5), "b": pseudo(1000, torch.float32, 6)}
    path = tmp_path / "s.dtdr"
    torch_dtdr.save(sd, path, codec="dtdr")
    with open_source(path) as src:
        g = ContainerReader(src).geometry
    if stripe_kind == "full":
        stripe, slots = 3, [0, 1, 2, 5, 8, 13, 21, 30, 31, 32, 33, 17]  # 32 and 33: the parity chunks
    else:
        stripe = g.n_stripes - 1
        d = g.data_chunks_in(stripe)
        assert d < g.k
        slots = [0, 1, d - 2, d, d + 1]  # d and d + 1: its parity chunks, right after its d data chunks
    data = bytearray(path.read_bytes())
    col = 11
    for slot in slots:
        start = stripe * g.stripe_span + slot * g.chunk_size
        for _ in range(3):
            data[start + col] ^= 0x5A
            col = (col + 97) % g.chunk_size
    path.write_bytes(bytes(data))
    with pytest.warns(DamageWarning):
        back, rep = torch_dtdr.load(path, errors="strict", report=True)
    assert rep.status == "repaired"
    for k, v in sd.items():
        assert_same(back[k], v)
    assert torch_dtdr.verify(path).status == "repaired"


def test_nested_object_types_preserved(tmp_path):
    obj = collections.OrderedDict(
        model={"w": torch.ones(3), "b": torch.zeros(2, dtype=torch.int32)},
        opt={"state": {0: {"step": torch.tensor(5.0)}, 1: {}}, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999)}]},
        step=17, name="run", blob=b"\x00\xff", flags=[True, None, float("-inf"), -0.0],
        dtype=torch.bfloat16, dev=torch.device("cpu"), size=torch.Size([2, 3]),
    )
    torch_dtdr.save(obj, tmp_path / "o.dtdr")
    back = torch_dtdr.load(tmp_path / "o.dtdr")
    assert type(back) is collections.OrderedDict and list(back) == list(obj)
    assert list(back["opt"]["state"]) == [0, 1]
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["step"] == 17 and back["blob"] == b"\x00\xff"
    assert str(back["flags"][3]) == "-0.0" and back["flags"][2] == float("-inf")
    assert back["dtype"] is torch.bfloat16 and back["size"] == torch.Size([2, 3])
    assert_same(back["model"]["b"], obj["model"]["b"])


def test_tied_weights_come_back_shared(tmp_path):
    w = pseudo(64 * 32).view(64, 32)
    sd = {"embed.weight": w, "lm_head.weight": w, "half": w[:32]}
    torch_dtdr.save(sd, tmp_path / "tied.dtdr")
    back = torch_dtdr.load(tmp_path / "tied.dtdr")
    assert back["embed.weight"].data_ptr() == back["lm_head.weight"].data_ptr()
    assert back["half"].untyped_storage().data_ptr() == back["embed.weight"].untyped_storage().data_ptr()
    assert_same(back["half"], w[:32])


def test_non_contiguous_views(tmp_path):
    x = pseudo(40 * 30).view(40, 30)
    sd = {"t": x.t(), "s": x[::3, 1::2]}
    torch_dtdr.save(sd, tmp_path / "v.dtdr")
    back = torch_dtdr.load(tmp_path / "v.dtdr")
    assert torch.equal(back["t"], x.t()) and torch.equal(back["s"], x[::3, 1::2])


def test_unsupported_type_names_its_place(tmp_path):
    with pytest.raises(TypeError, match="opt"):
        torch_dtdr.save({"opt": {"x": {1, 2j, object()}}}, tmp_path / "bad.dtdr")
    assert not (tmp_path / "bad.dtdr").exists()


def test_file_objects_and_memory_urls(tmp_path):
    x = pseudo(5000)
    buf = io.BytesIO()
    torch_dtdr.save({"x": x}, buf)
    buf.seek(0)
    assert_same(torch_dtdr.load(buf)["x"], x)
    torch_dtdr.save({"x": x}, "memory://ckpt/a.dtdr")
    assert_same(torch_dtdr.load("memory://ckpt/a.dtdr")["x"], x)
    torch_dtdr.save({"x": x}, f"file://{tmp_path}/b.dtdr")
    assert_same(torch_dtdr.load(str(tmp_path / "b.dtdr"))["x"], x)


@pytest.mark.parametrize("parity", ["default", "off", "strong", (4, 2)])
def test_a_local_file_holds_the_bytes_a_file_object_gets(tmp_path, parity):
    """A local path takes whole runs of stripes at once (writev, no copy into a buffer), a file
    object one piece at a time: the same bytes, at every parity level (the archive level's inner
    blocks sit between stripes)."""
    sd = {"w": pseudo(300_000, torch.float32, 1), "b": pseudo(77, torch.bfloat16, 2), "i": torch.arange(5000)}
    path = tmp_path / "m.dtdr"
    torch_dtdr.save(sd, path, parity=parity)
    buf = io.BytesIO()
    torch_dtdr.save(sd, buf, parity=parity)
    assert path.read_bytes() == buf.getvalue()
    for k, v in torch_dtdr.load(path, errors="strict").items():
        assert_same(v, sd[k])


def test_map_location_forms(tmp_path):
    p = tmp_path / "m.dtdr"
    torch_dtdr.save({"x": torch.ones(4)}, p)
    assert torch_dtdr.load(p, map_location="cpu")["x"].device.type == "cpu"
    assert torch_dtdr.load(p, map_location=torch.device("cpu"))["x"].device.type == "cpu"
    assert torch_dtdr.load(p, map_location={"cpu": "meta"})["x"].device.type == "meta"
    seen = []

    def fn(storage, location):
        seen.append(location)
        return None

    assert torch_dtdr.load(p, map_location=fn)["x"].device.type == "cpu"
    assert seen == ["cpu"]
    assert torch_dtdr.load(p, map_location=lambda s, loc: "meta")["x"].device.type == "meta"


@pytest.mark.parametrize("codec,bound", [("dtdr8", 0.012), ("dtdr16", 2e-4)])
def test_lossy_codecs(tmp_path, codec, bound):
    sd = llm_state_dict(1, 128)
    torch_dtdr.save(sd, tmp_path / "l.dtdr", codec=codec)
    back = torch_dtdr.load(tmp_path / "l.dtdr")
    for k, v in sd.items():
        err = (back[k].double() - v.double()).norm() / v.double().norm()
        assert err <= bound, (k, float(err))
    assert os.path.getsize(tmp_path / "l.dtdr") < sum(v.numel() * v.element_size() for v in sd.values())


def test_codec_per_tensor_by_pattern_and_callable(tmp_path):
    sd = {"a.weight": pseudo(4096), "b.weight": pseudo(4096, seed=2), "ids": torch.arange(10)}
    torch_dtdr.save(sd, tmp_path / "p.dtdr", codec={"a.*": "dtdr8", "*": "dtdr"})
    with torch_dtdr.open(tmp_path / "p.dtdr") as f:
        codecs = {k: f.codec(k) for k in f.keys()}
    assert codecs == {"a.weight": "dtdr8", "b.weight": "dtdr", "ids": "raw"}
    torch_dtdr.save(sd, tmp_path / "c.dtdr", codec=lambda name, t: "raw" if name.startswith("b") else None)
    with torch_dtdr.open(tmp_path / "c.dtdr") as f:
        assert f.codec("b.weight") == "raw" and f.codec("a.weight") == "dtdr"


def test_open_is_lazy(tmp_path):
    sd = llm_state_dict(2, 128)
    p = tmp_path / "lazy.dtdr"
    torch_dtdr.save(sd, p, metadata={"step": "12"})
    size = os.path.getsize(p)
    with torch_dtdr.open(p) as f:
        assert set(f.keys()) == set(sd)
        assert f.metadata() == {"step": "12"}
        before = f.bytes_read
        t = f.get_tensor("layers.1.norm.weight")
        read_for_tensor = f.bytes_read - before
    assert_same(t, sd["layers.1.norm.weight"])
    assert read_for_tensor < 3 * 4096 * 2 and f.bytes_read < size / 4


def test_not_dtdr_and_missing_files(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"hello world" * 1000)
    with pytest.raises(FormatError):  # the DTDR reader itself; torch_dtdr.load hands non-DTDR files to torch.load
        torch_dtdr.api.load(p)
    with pytest.raises(FormatError):
        torch_dtdr.open(p)
    with pytest.raises(CheckpointNotFoundError) as e:
        torch_dtdr.load(tmp_path / "nope.dtdr")
    assert isinstance(e.value, FileNotFoundError) and "nope.dtdr" in str(e.value)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(DTDRError):
        torch_dtdr.api.load(tmp_path / "empty")


def test_failed_save_leaves_nothing(tmp_path):
    p = tmp_path / "keep.dtdr"
    torch_dtdr.save({"x": torch.ones(3)}, p)
    original = p.read_bytes()

    def boom(name, tensor):
        if name == "later":
            raise RuntimeError("disk on fire")
        return "dtdr"

    with pytest.raises(RuntimeError):
        torch_dtdr.save({"x": pseudo(100000), "later": torch.ones(2)}, p, codec=boom)
    assert p.read_bytes() == original
    assert [q.name for q in tmp_path.iterdir()] == ["keep.dtdr"]


# --------------------------------------------------------------------- damage
@pytest.fixture()
def saved(tmp_path):
    sd = llm_state_dict(2, 128)
    sd["step"] = torch.tensor(1234)
    p = tmp_path / "d.dtdr"
    torch_dtdr.save(sd, p)
    return sd, str(p)


def check_exact(sd, back):
    for k, v in sd.items():
        assert_same(back[k], v)


def test_every_aligned_page_zeroed_is_repaired(saved, tmp_path):
    sd, p = saved
    raw = open(p, "rb").read()
    pages = len(raw) // 4096
    step = max(1, pages // 24)
    for page in list(range(0, pages, step)) + [pages - 1, pages - 2, 1]:
        q = tmp_path / "z.dtdr"
        q.write_bytes(raw[: page * 4096] + bytes(4096) + raw[(page + 1) * 4096:])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DamageWarning)
            back = torch_dtdr.load(q, errors="strict")
        check_exact(sd, back)


def test_recover_warns_and_strict_raises_on_unrepairable(saved, tmp_path):
    sd, p = saved
    r = regions(p)
    start, end = r["tensor:layers.0.mlp.up.weight:base"][0]
    zero_range(p, start, min(end - start, 4096 * 8))
    with pytest.raises(IntegrityError) as e:
        torch_dtdr.load(p, errors="strict")
    assert e.value.tensor == "layers.0.mlp.up.weight" and e.value.byte_range is not None
    with pytest.warns(DamageWarning):
        back, rep = torch_dtdr.load(p, report=True)
    t = {x.name: x for x in rep.tensors}["layers.0.mlp.up.weight"]
    assert t.status == "degraded" and t.degraded_elements > 0
    assert torch.isfinite(back["layers.0.mlp.up.weight"]).all()
    err = (back["layers.0.mlp.up.weight"] - sd["layers.0.mlp.up.weight"]).abs().max().item()
    assert err <= t.error_bound
    assert_same(back["layers.1.mlp.up.weight"], sd["layers.1.mlp.up.weight"])


def test_random_damage_never_gives_nan(saved, tmp_path):
    sd, p = saved
    raw = bytearray(open(p, "rb").read())
    g = torch.Generator().manual_seed(0)
    for rate in (1e-4, 1e-3, 1e-2):
        d = bytearray(raw)
        n = max(1, int(len(d) * rate))
        pos = torch.randint(0, len(d), (n,), generator=g).tolist()
        for i in pos:
            d[i] ^= 0x5A
        q = tmp_path / "r.dtdr"
        q.write_bytes(bytes(d))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DamageWarning)
            back, rep = torch_dtdr.load(q, report=True, partial=True)
        for k, v in sd.items():
            if back[k] is None:
                assert {t.name: t.status for t in rep.tensors}[k] == "lost"
                continue
            if v.is_floating_point():
                assert torch.isfinite(back[k]).all(), (rate, k)


def test_index_and_trailer_damage(saved, tmp_path):
    sd, p = saved
    r = regions(p)
    for start, end in r["index"][:3]:
        zero_range(p, start, 64)
    check_exact(sd, torch_dtdr.load(p, errors="strict"))
    size = os.path.getsize(p)
    zero_range(p, size - 128, 128)
    with pytest.warns(DamageWarning):
        back, rep = torch_dtdr.load(p, report=True)
    check_exact(sd, back)
    assert any("trailer" in e for e in rep.events)


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncation(saved, tmp_path, keep):
    sd, p = saved
    raw = open(p, "rb").read()
    q = tmp_path / "t.dtdr"
    q.write_bytes(raw[: int(len(raw) * keep)])
    if keep < 0.99:  # 99.9 % cuts only into the footer: every tensor is still exact
        with pytest.raises((TruncatedError, FormatError)):
            torch_dtdr.load(q, errors="strict")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DamageWarning)
            back, rep = torch_dtdr.load(q, report=True, partial=True)
    except (TruncatedError, FormatError):
        assert keep < 0.5
        return
    assert rep.truncated
    status = {t.name: t.status for t in rep.tensors}
    for k, v in sd.items():
        if back[k] is None:
            assert status[k] == "lost"
        elif status[k] in ("exact", "repaired"):
            assert_same(back[k], v)
        else:
            assert status[k] == "degraded" and torch.isfinite(back[k]).all()


def test_verify_and_repair(saved, tmp_path):
    sd, p = saved
    assert torch_dtdr.verify(p).exit_code == 0
    r = regions(p)
    s, _e = r["tensor:layers.1.attn.q.weight:base"][0]
    zero_range(p, s // 4096 * 4096, 4096)
    rep = torch_dtdr.verify(p)
    assert rep.exit_code == 1 and rep.status == "repaired"
    assert "repaired" in str(rep) and '"status": "repaired"' in rep.to_json()
    out = tmp_path / "healed.dtdr"
    torch_dtdr.repair(p, out)
    assert torch_dtdr.verify(out).exit_code == 0
    check_exact(sd, torch_dtdr.load(out, errors="strict"))


@pytest.mark.parametrize("rate", [1e-3, 1e-2])
def test_archive_parity_repairs_scattered_byte_errors(tmp_path, rate):
    import numpy as np

    sd = {"w": pseudo(200_000), "ids": torch.arange(3000)}
    p = tmp_path / "a.dtdr"
    torch_dtdr.save(sd, p, parity="archive")
    raw = bytearray(p.read_bytes())
    rng = np.random.default_rng(1)
    for i in rng.choice(len(raw), int(len(raw) * rate), replace=False):
        raw[i] ^= 1 + int(rng.integers(0, 255))
    q = tmp_path / "b.dtdr"
    q.write_bytes(bytes(raw))
    with pytest.warns(DamageWarning):
        back, rep = torch_dtdr.load(q, report=True)
    check_exact(sd, back)  # at 1e-2 the chunk checksums themselves are damaged: voted copies + trusted inner code
    assert rep.exact and rep.status == "repaired"
    torch_dtdr.save(sd, p, parity="default")
    assert 1.10 < len(raw) / os.path.getsize(p) < 1.25  # the inner code costs 608 bytes per 4 KiB chunk


def test_small_integer_tensors_survive_scattered_damage(tmp_path):
    import numpy as np

    sd = {"position_ids": torch.arange(512).view(1, 512), "w": pseudo(100_000)}
    p = tmp_path / "i.dtdr"
    torch_dtdr.save(sd, p)
    with torch_dtdr.open(p) as f:
        assert f._reader.tensors[0].records[0].sections[0].copies == 5
    raw = p.read_bytes()
    for seed in range(8):
        rng = np.random.default_rng(seed)
        d = bytearray(raw)
        for i in rng.choice(len(d), len(d) // 1000, replace=False):
            d[i] ^= 1 + int(rng.integers(0, 255))
        q = tmp_path / "d.dtdr"
        q.write_bytes(bytes(d))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DamageWarning)
            back = torch_dtdr.load(q)
        assert_same(back["position_ids"], sd["position_ids"])
