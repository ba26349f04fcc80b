"""``workers=`` on load, open, verify and repair; load's keyword checking on
DTDR files; the physical-core count that sizes the default thread pools; the
single-threaded copy that assembles multi-segment tensors."""

from __future__ import annotations

import io
import threading

import pytest
import torch

import torch_dtdr
from torch_dtdr import _cpu
from torch_dtdr.codecs.base import copy_elements, flat_contiguous
from torch_dtdr.codecs.dtdr import DTDR as DTDRCodec
from torch_dtdr.errors import ArgumentError, DamageWarning, FormatError

from .helpers import assert_same, pseudo, zero_range

SEGMENT = 50_000


@pytest.fixture()
def saved(tmp_path):
    sd = {"big": pseudo(6 * SEGMENT + 123, torch.bfloat16, 3),
          "w": pseudo(3 * SEGMENT + 7, torch.float32, 4),
          "flags": torch.arange(100) % 3 == 0,
          "z": torch.randn(SEGMENT + 5, dtype=torch.complex64)}
    path = tmp_path / "m.dtdr"
    torch_dtdr.save(sd, path, segment_elems=SEGMENT)
    return sd, path


@pytest.fixture()
def decode_threads(monkeypatch):
    """Names of the threads the lossless codec decoded segments on (the real decode runs)."""
    names: list[str] = []
    real = DTDRCodec.decode

    def spy(self, *args, **kwargs):
        names.append(threading.current_thread().name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DTDRCodec, "decode", spy)
    return names


def test_load_workers_give_the_same_tensors(saved):
    sd, path = saved
    for workers in (1, 2, 3):
        back = torch_dtdr.load(path, errors="strict", workers=workers)
        for k, v in sd.items():
            assert_same(back[k], v)


def test_a_lone_tensor_decodes_its_segments_on_the_workers(tmp_path, decode_threads):
    t = pseudo(8 * SEGMENT + 11, torch.float32, 5)
    path = tmp_path / "one.dtdr"
    torch_dtdr.save(t, path, segment_elems=SEGMENT)
    assert_same(torch_dtdr.load(path, errors="strict", workers=1), t)
    assert decode_threads and not any(n.startswith("dtdr-decode-segment") for n in decode_threads)
    decode_threads.clear()
    assert_same(torch_dtdr.load(path, errors="strict", workers=2), t)
    assert len(decode_threads) == 9
    assert all(n.startswith("dtdr-decode-segment") for n in decode_threads)


def test_open_verify_repair_take_workers(saved, tmp_path, decode_threads):
    sd, path = saved
    with torch_dtdr.open(path, workers=2) as f:
        for k, v in sd.items():
            assert_same(f.get_tensor(k), v)
        assert any(n.startswith("dtdr-decode-segment") for n in decode_threads)
        whole = f.load()
    for k, v in sd.items():
        assert_same(whole[k], v)
    decode_threads.clear()
    serial = torch_dtdr.verify(path, workers=1)
    assert not any(n.startswith("dtdr-decode-segment") for n in decode_threads)
    parallel = torch_dtdr.verify(path, workers=2)
    assert any(n.startswith("dtdr-decode-segment") for n in decode_threads)
    assert serial.exact and parallel.exact
    assert serial.to_dict()["tensors"] == parallel.to_dict()["tensors"]
    # damage, repaired under segment-parallel verify and repair
    zero_range(path, 8192, 4096)
    assert torch_dtdr.verify(path, workers=2).status == "repaired"
    out = tmp_path / "healed.dtdr"
    rep = torch_dtdr.repair(path, out, workers=2)
    assert rep.status == "repaired"
    back = torch_dtdr.load(out, errors="strict", workers=2)
    for k, v in sd.items():
        assert_same(back[k], v)


def test_degraded_segments_come_back_the_same_with_workers(saved):
    sd, path = saved
    size = path.stat().st_size
    # three chunks of one stripe: more than default parity (2 per stripe) restores
    for start in (20_000, 28_192, 36_384):
        zero_range(path, start, 4096)
    results = []
    for workers in (1, 2):
        with pytest.warns(DamageWarning):
            back, rep = torch_dtdr.load(path, report=True, workers=workers, partial=True)
        results.append((back, rep.to_dict()["tensors"]))
    assert path.stat().st_size == size
    (one, rep_one), (two, rep_two) = results
    assert rep_one == rep_two
    assert any(t["status"] not in ("exact", "repaired") for t in rep_one)
    for k in sd:
        if one[k] is None:
            assert two[k] is None
        else:
            assert one[k].view(torch.uint8).equal(two[k].view(torch.uint8))


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_bad_workers_are_refused(saved, bad):
    _sd, path = saved
    with pytest.raises(ArgumentError, match="workers"):
        torch_dtdr.load(path, workers=bad)
    with pytest.raises(ArgumentError, match="workers"):
        torch_dtdr.open(path, workers=bad)
    with pytest.raises(ArgumentError, match="workers"):
        torch_dtdr.verify(path, workers=bad)
    with pytest.raises(ArgumentError, match="workers"):
        torch_dtdr.repair(path, path.with_suffix(".out"), workers=bad)


def test_unknown_keyword_on_a_dtdr_file_is_a_type_error(saved):
    _sd, path = saved
    with pytest.raises(TypeError, match="'max_worker'"):
        torch_dtdr.load(path, max_worker=4)  # a typo, once swallowed silently
    with pytest.raises(TypeError, match="'bogus'"):
        torch_dtdr.load(io.BytesIO(path.read_bytes()), bogus=True)
    with torch_dtdr.patch(), pytest.raises(TypeError, match="'bogus'"):
        torch.load(path, bogus=True)


def test_pickle_keywords_are_accepted_and_ignored_on_a_dtdr_file(saved):
    sd, path = saved
    back = torch_dtdr.load(path, encoding="latin1", fix_imports=False, buffers=None, errors="strict")
    assert_same(back["big"], sd["big"])
    with torch_dtdr.patch():
        assert_same(torch.load(path, encoding="latin1", workers=2)["w"], sd["w"])


def test_pickle_keywords_are_the_unpicklers():
    import inspect
    import pickle

    params = set(inspect.signature(pickle.Unpickler).parameters) - {"file"}
    assert torch_dtdr.api.PICKLE_LOAD_KEYWORDS == params - {"errors"}


def test_torch_files_still_take_pickle_keywords(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"a": torch.arange(4)}, path)
    back = torch_dtdr.load(path, weights_only=False, encoding="latin1")
    assert back["a"].equal(torch.arange(4))
    # and a keyword torch.load's unpickler rejects is torch's own error, as before
    with pytest.raises(TypeError):
        torch_dtdr.load(path, weights_only=False, bogus=True)


def _topology(root, siblings: dict[int, str], name: str = "core_cpus_list") -> str:
    for cpu, text in siblings.items():
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / name).write_text(text + "\n")
    return str(root)


def test_physical_cores_count_hyperthread_pairs_once(tmp_path):
    sysfs = _topology(tmp_path, {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"})
    assert _cpu.physical_cores({0, 1, 2, 3}, sysfs) == 2
    assert _cpu.physical_cores({0, 2}, sysfs) == 1  # the affinity mask holds one core's two threads
    assert _cpu.physical_cores({0, 1}, sysfs) == 2


def test_physical_cores_without_hyperthreads_and_older_kernels(tmp_path):
    sysfs = _topology(tmp_path, {0: "0", 1: "1"}, name="thread_siblings_list")
    assert _cpu.physical_cores({0, 1}, sysfs) == 2
    assert _cpu.physical_cores({0, 1, 5}, sysfs) is None  # cpu5's topology is unreadable
    assert _cpu.physical_cores({0}, str(tmp_path / "missing")) is None


def test_parse_cpu_list():
    assert _cpu.parse_cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert _cpu.parse_cpu_list("5") == {5}


def test_compute_cores_is_within_the_affinity_mask():
    assert 1 <= _cpu.compute_cores() <= len(_cpu.usable_cpus())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.bool, torch.complex64,
                                   torch.int64, torch.uint8])
def test_copy_elements_is_slice_assignment(dtype):
    src = (torch.arange(1000) % 7 - 3).to(dtype)
    out = torch.zeros(3000, dtype=dtype)
    expected = out.clone()
    expected[1234:2234] = src
    copy_elements(out, 1234, src)
    assert out.view(torch.uint8).equal(expected.view(torch.uint8))
    strided = torch.zeros(20, dtype=dtype)[::2]  # not contiguous: the torch path, same result
    copy_elements(strided, 3, src[:5])
    assert strided[3:8].equal(src[:5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.bool, torch.complex64,
                                   torch.complex128, torch.int8])
def test_flat_contiguous_is_reshape_contiguous(dtype):
    base = (torch.arange(6 * 35) % 11 - 5).to(dtype).reshape(6, 35)
    for t in (base, base.t(), base[:, ::3], base.t()[::2], base[:0]):
        got = flat_contiguous(t)
        assert got.is_contiguous() and got.dtype == dtype and got.shape == (t.numel(),)
        assert got.view(torch.uint8).equal(t.reshape(-1).contiguous().view(torch.uint8))
    if dtype.is_complex:
        conj = base.t().conj()  # a lazy conjugate: the torch path resolves it
        assert flat_contiguous(conj).equal(conj.reshape(-1).contiguous())


def test_strided_tensors_round_trip(tmp_path):
    weight = pseudo(300 * 257, torch.bfloat16, 8).reshape(300, 257)
    sd = {"t": weight.t(), "every_other": weight[:, ::2], "bits": (weight > 0).t()}
    for codec in ("dtdr", "raw"):
        path = tmp_path / f"s.{codec}"
        torch_dtdr.save(sd, path, codec=codec, segment_elems=10_000)
        back = torch_dtdr.load(path, errors="strict")
        for k, v in sd.items():
            assert back[k].shape == v.shape and back[k].equal(v)


def test_a_malformed_tree_fails_a_load_whose_big_tensors_are_already_decoding(tmp_path):
    """The skeleton is checked while the workers decode the big tensors: a bad one still fails the load,
    with the FormatError, every worker stopped and nothing returned."""
    from fuzz import craft

    sd = {f"w{i}": torch.randn(40_000) for i in range(6)}
    sd["bias"] = torch.randn(4)
    data = craft.save_bytes(sd, codec="dtdr")
    doc = craft.parse(data).index
    doc["tree"]["tensors"][3]["offset"] = 10 ** 9  # a view far outside its entry
    path = tmp_path / "bad_tree.dtdr"
    path.write_bytes(craft.reseal(data, doc))
    before = threading.active_count()
    with pytest.raises(FormatError, match="offset"):
        torch_dtdr.load(path, workers=2)
    assert threading.active_count() == before
