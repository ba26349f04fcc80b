"""``torch_dtdr.open`` answers like safetensors' ``safe_open``: keys, metadata,
shapes, dtypes, tensors and slices, reading only the bytes a slice needs."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import torch_dtdr
from torch_dtdr import faults
from torch_dtdr.errors import ArgumentError, DamageWarning

SEGMENT = 1 << 14  # elements per segment: small, so that the transform-codec tensor has many


def tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {
        "raw.weight": torch.randn(256, 512, generator=gen),
        "transform.weight": torch.randn(192, 384, generator=gen),
        "cube": torch.randn(6, 10, 14, generator=gen),
        "half": torch.randn(40, 24, generator=gen).to(torch.bfloat16),
        "ids": torch.arange(3 * 50, dtype=torch.int64).reshape(3, 50),
        "mask": torch.rand(33, generator=gen) > 0.5,
        "scalar": torch.tensor(3.5),
    }


CODECS = {"raw.weight": "raw", "ids": "raw", "mask": "raw", "*": "dtdr"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("slices")
    sd = tensors()
    st = str(d / "model.safetensors")
    save_file(sd, st, metadata={"source": "test", "step": "12"})
    dt = str(d / "model.dtdr")
    torch_dtdr.save(sd, dt, codec=CODECS, metadata={"source": "test", "step": "12"}, segment_elems=SEGMENT)
    return st, dt


KEYS = {
    "raw.weight": [0, -1, slice(3, 9), (slice(None), slice(None, None, 5)), (Ellipsis, 7), (slice(10, 20), 3),
                   (slice(1, 200, 37), slice(500, None)), Ellipsis, (), slice(None)],
    "transform.weight": [5, (slice(100, 101),), (slice(None, None, 50), slice(2, 300, 3)), (Ellipsis, slice(-3, None))],
    "cube": [(1, Ellipsis, 2), (Ellipsis, slice(2, 5)), (slice(None), 3, slice(None, None, 4)), (-2, -1, -1)],
    "half": [(slice(5, 7),), (Ellipsis, slice(None, None, 2))],
    "ids": [1, (slice(None), slice(10, 40, 3))],
    "mask": [slice(3, 30, 2), 0],
    "scalar": [Ellipsis, ()],
}


def test_keys_metadata_shapes_and_dtypes_match_safe_open(files):
    st, dt = files
    with safe_open(st, framework="pt") as ref, torch_dtdr.open(dt) as f:
        assert sorted(f.keys()) == sorted(ref.keys())
        assert f.metadata() == ref.metadata()
        for name in ref.keys():
            assert f.get_slice(name).get_shape() == ref.get_slice(name).get_shape(), name
            assert f.get_slice(name).get_dtype() == ref.get_slice(name).get_dtype(), name
            assert torch.equal(f.get_tensor(name), ref.get_tensor(name)), name


@pytest.mark.parametrize("name", sorted(KEYS))
def test_slices_match_safe_open(files, name):
    st, dt = files
    with safe_open(st, framework="pt") as ref, torch_dtdr.open(dt) as f:
        for key in KEYS[name]:
            want = ref.get_slice(name)[key]
            got = f.get_slice(name)[key]
            assert got.dtype == want.dtype and got.shape == want.shape, (name, key)
            assert torch.equal(got, want), (name, key)
            assert got.is_contiguous()


def test_slices_of_every_form_match_torch_indexing(files):
    _st, dt = files
    sd = tensors()
    with torch_dtdr.open(dt) as f:
        t = sd["cube"]
        for key in [(slice(None, None, 3), Ellipsis), (0, 0, 0), (Ellipsis,), (slice(4, 2),), (slice(-100, 100),)]:
            assert torch.equal(f.get_slice("cube")[key], t[key]), key


def test_a_slice_of_a_raw_tensor_reads_only_its_rows(files):
    _st, dt = files
    whole = 256 * 512 * 4
    with torch_dtdr.open(dt) as f:
        before = f.bytes_read
        rows = f.get_slice("raw.weight")[10:12]
        sliced = f.bytes_read - before
        assert torch.equal(rows, tensors()["raw.weight"][10:12])
    # two rows are 4 KiB; checksums are per 4 KiB chunk, so at most a few chunks more
    assert 0 < sliced <= 4 * 4096, sliced
    with torch_dtdr.open(dt) as f:
        before = f.bytes_read
        f.get_tensor("raw.weight")
        assert f.bytes_read - before >= whole


def test_a_slice_of_a_transform_tensor_decodes_only_its_segments(files):
    _st, dt = files
    with torch_dtdr.open(dt) as f:
        before = f.bytes_read
        f.get_tensor("transform.weight")
        whole = f.bytes_read - before
    with torch_dtdr.open(dt) as f:
        before = f.bytes_read
        row = f.get_slice("transform.weight")[5]
        sliced = f.bytes_read - before
    assert torch.equal(row, tensors()["transform.weight"][5])
    segments = -(-192 * 384 // SEGMENT)
    assert sliced <= 2 * whole / segments, (sliced, whole)


def test_get_tensors_reads_each_once_in_one_plan(files):
    st, dt = files
    names = ["cube", "ids", "raw.weight"]
    with torch_dtdr.open(dt) as f:
        got = f.get_tensors(names)
        together = f.bytes_read
    with torch_dtdr.open(dt) as f:
        for n in names:
            f.get_tensor(n)
        one_by_one = f.bytes_read
    assert list(got) == names
    with safe_open(st, framework="pt") as ref:
        for n in names:
            assert torch.equal(got[n], ref.get_tensor(n)), n
    assert together <= one_by_one


def test_bad_names_and_indices_raise_typed_errors(files):
    _st, dt = files
    with torch_dtdr.open(dt) as f:
        with pytest.raises(KeyError, match="nope"):
            f.get_slice("nope")
        with pytest.raises(KeyError, match="nope"):
            f.get_tensors(["cube", "nope"])
        s = f.get_slice("cube")
        with pytest.raises(IndexError):
            s[6]
        with pytest.raises(IndexError):
            s[0, 0, 0, 0]
        with pytest.raises(ArgumentError):
            s[::-1]
        with pytest.raises(ArgumentError):
            s[::0]
        with pytest.raises(ArgumentError):
            s[Ellipsis, Ellipsis]
        with pytest.raises(ArgumentError):
            s["x"]


def test_a_damaged_slice_is_zeroed_not_wrong_and_warns(tmp_path):
    path = str(tmp_path / "raw.dtdr")
    t = torch.randn(64, 1024)
    torch_dtdr.save({"w": t}, path, codec="raw", parity="off")
    faults.corrupt(path, mode="replace", fraction=1e-3, seed=2)
    with torch_dtdr.open(path) as f, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = f.get_tensor("w")
        part = f.get_slice("w")[:, 100:300]
    assert torch.equal(part, full[:, 100:300])
    assert (part != t[:, 100:300]).any(), "the damage missed the slice; pick another seed"
    assert ((part == t[:, 100:300]) | (part == 0)).all()
    assert any(issubclass(w.category, DamageWarning) for w in caught)
    with torch_dtdr.open(path, errors="strict") as f:
        with pytest.raises(torch_dtdr.errors.IntegrityError):
            f.get_slice("w")[:, 100:300]


def test_slices_of_saved_views_follow_their_strides(tmp_path):
    """Views saved sharing storage (a row block, a transpose, a column) are
    sliced through their own offset and strides."""
    t = torch.randn(40, 30)
    path = str(tmp_path / "views.dtdr")
    views = {"rows": t[3:7], "transposed": t.t(), "column": t[:, 2]}
    torch_dtdr.save({"base": t, **views}, path, codec="raw")
    with torch_dtdr.open(path) as f:
        for name, ref in views.items():
            keys = [Ellipsis, 1, (Ellipsis, slice(1, None, 3)), slice(2, 5)]
            if ref.dim() > 1:
                keys.append((slice(2, 5), 0))
            for key in keys:
                assert torch.equal(f.get_slice(name)[key], ref[key]), (name, key)


def test_a_slice_of_a_truncated_file_matches_the_recovered_tensor(tmp_path):
    path = tmp_path / "cut.dtdr"
    t = torch.randn(128, 256)
    torch_dtdr.save({"a": t, "b": t * 2}, str(path), codec="raw")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamageWarning)
        with torch_dtdr.open(str(path)) as f:
            for name in f.keys():
                whole = f.get_tensor(name)
                part = f.get_slice(name)[5:9, ::3]
                assert (part is None) == (whole is None), name
                if whole is not None:
                    assert torch.equal(part, whole[5:9, ::3]), name
