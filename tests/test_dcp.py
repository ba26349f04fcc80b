"""torch.distributed.checkpoint (DCP) on DTDR storage: torch_dtdr.dcp.

Real multi-process runs: two ranks (gloo on CPU, 127.0.0.1) save DTensors
sharded across them plus replicated tensors and plain values, then load with
two ranks under a different sharding and with one process. Damage, interrupted
saves, fsspec stores (memory://, S3 via moto), verify and the converters run
in the test process.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import sys
import warnings

import pytest
import torch

import torch_dtdr
from torch_dtdr import dcp as tdcp
from torch_dtdr.errors import CheckpointNotFoundError, FormatError, IntegrityError

from .helpers import assert_same, pseudo, zero_range

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

try:  # public since torch 2.5
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # pragma: no cover
    from torch.distributed._tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

WORLD = 2


# --------------------------------------------------------------------------- the state dict


def full_state() -> dict:
    """Full (unsharded) values: what every load must give back, bit for bit."""
    return {
        "w": pseudo(64 * 48, torch.float32, 1).view(64, 48),  # even Shard(0)
        "e": pseudo(37 * 20, torch.bfloat16, 2).view(37, 20),  # uneven shards
        "h": pseudo(9 * 1000, torch.float16, 3).view(9, 1000),
        "r": torch.arange(300, dtype=torch.int64).view(30, 10) * 7 - 1000,  # plain tensor, replicated
        "s": torch.tensor(3.5, dtype=torch.float64),  # 0-d
        "extra": {"step": 17, "name": "run-α", "lrs": [0.1, 0.01], "flag": True},  # DCP byte items
    }


def dist_state(mesh, placements) -> dict:
    f = full_state()
    return {
        "w": distribute_tensor(f["w"], mesh, placements),
        "e": distribute_tensor(f["e"], mesh, placements),
        "h": distribute_tensor(f["h"], mesh, placements),
        "r": f["r"].clone(),
        "s": f["s"].clone(),
        "extra": f["extra"],
    }


def empty_like_state(full: dict) -> dict:
    blank = {"step": 0, "name": "", "lrs": [], "flag": False}
    return {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else dict(blank)) for k, v in full.items()}


def check_state(got: dict, want: dict | None = None) -> None:
    want = full_state() if want is None else want
    assert set(got) == set(want)
    for k, v in want.items():
        g = got[k]
        if isinstance(g, DTensor):
            g = g.full_tensor()
        if isinstance(v, torch.Tensor):
            assert_same(g, v)
        else:
            assert g == v, (k, g, v)


def _quiet_dcp() -> None:
    """Inside catch_warnings: drop DCP's "torch.distributed is disabled ... single process" notes
    (not DamageWarning, which is a UserWarning too)."""
    warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
    warnings.filterwarnings("ignore", message=r".*DeviceMesh", category=UserWarning)


# --------------------------------------------------------------------------- workers (run in spawned ranks)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, port: int) -> None:
    import faulthandler

    faulthandler.enable()  # a crash in C++ (gloo) shows the Python stack instead of just "SIGABRT"
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    _quiet_dcp()
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def _worker(rank: int, port: int, root: str) -> None:
    _init(rank, port)
    ok = False
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        Writer, Reader = tdcp.DTDRWriter, tdcp.DTDRReader

        # 1. save, sharded along dim 0
        path = os.path.join(root, "ckpt")
        dcp.save(dist_state(mesh, [Shard(0)]), storage_writer=Writer(path))
        dist.barrier()

        # 2. load with two ranks, resharded along dim 1 (DCP asks for sub-ranges of each stored shard)
        target = dist_state(mesh, [Shard(1)])
        for k in ("w", "e", "h"):
            target[k] = distribute_tensor(torch.zeros_like(full_state()[k]), mesh, [Shard(1)])
        target["r"].zero_()
        target["s"].zero_()
        target["extra"] = {"step": 0, "name": "", "lrs": [], "flag": False}
        reader = Reader(path, errors="strict")
        dcp.load(target, storage_reader=reader)
        check_state(target)
        assert reader.report().exact

        # ... and into replicated DTensors
        target = {k: (distribute_tensor(torch.zeros_like(v), mesh, [Replicate()]) if k in ("w", "e", "h") else v)
                  for k, v in empty_like_state(full_state()).items()}
        dcp.load(target, storage_reader=Reader(path))
        check_state(target)

        # 3. an interrupted save: rank 1 fails while writing its shard
        class FailingWriter(Writer):
            def write_data(self, plan, planner):
                if dist.get_rank() == 1:
                    raise RuntimeError("simulated crash while writing")
                return super().write_data(plan, planner)

        with pytest.raises(CheckpointException, match="simulated crash while writing"):
            dcp.save(dist_state(mesh, [Shard(0)]), storage_writer=FailingWriter(os.path.join(root, "interrupted")))
        dist.barrier()

        # 4. a complete checkpoint overwritten by a save that dies after every shard
        #    is written but before the coordinator commits: the old one must not
        #    survive as "complete" over the new shards
        over = os.path.join(root, "overwritten")
        dcp.save(dist_state(mesh, [Shard(0)]), storage_writer=Writer(over))
        dist.barrier()

        class DiesBeforeCommit(Writer):
            def finish(self, metadata, results):
                raise RuntimeError("simulated crash before commit")

        changed = dist_state(mesh, [Shard(0)])
        changed["w"] = distribute_tensor(full_state()["w"] + 1, mesh, [Shard(0)])
        with pytest.raises(CheckpointException, match="simulated crash before commit"):
            dcp.save(changed, storage_writer=DiesBeforeCommit(over))
        dist.barrier()
        ok = True
    except CheckpointException as e:  # a BaseException: torch.multiprocessing would only report "exit code 1"
        raise RuntimeError(f"rank {rank}: {e}") from None
    finally:
        dist.destroy_process_group()
    if ok:
        # Now and then a gloo background thread aborts the interpreter's exit ("terminate called
        # without an active exception", no Python frame); the work is done and checked, so
        # leave without running C++ static destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """One spawn of two ranks that runs every multi-process scenario (saves, 2 -> 2 loads,
    interrupted saves); the tests below examine what it left behind."""
    root = str(tmp_path_factory.mktemp("dcp"))
    mp.spawn(_worker, args=(_free_port(), root), nprocs=WORLD, join=True)
    return root


def raises(match: str):
    """DCP wraps failures in CheckpointException, a BaseException."""
    return pytest.raises((Exception, CheckpointException), match=match)


def _one_process_load(path, **reader_kwargs) -> dict:
    target = empty_like_state(full_state())
    with warnings.catch_warnings():
        _quiet_dcp()
        dcp.load(target, storage_reader=tdcp.DTDRReader(path, **reader_kwargs))
    return target


# --------------------------------------------------------------------------- multi-process bars


def _dcp_sources():
    """The source files of the torch_dtdr.dcp package."""
    folder = os.path.dirname(tdcp.__file__)
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".py"))


def test_two_ranks_save_two_and_one_rank_load(two_rank_run):
    path = os.path.join(two_rank_run, "ckpt")
    names = sorted(os.listdir(path))
    assert names == ["__0_0.dtdr", "__1_0.dtdr", "metadata.copy.dtdr", "metadata.dtdr"]
    # each rank wrote its own shard of every DTensor
    for f in ("__0_0.dtdr", "__1_0.dtdr"):
        with torch_dtdr.open(os.path.join(path, f)) as c:
            keys = c.keys()
        assert {k.split("@")[0] for k in keys} >= {"w", "e", "h"}
    # 2 -> 1: the whole state, bit-exact, in strict mode
    check_state(_one_process_load(path, errors="strict"))


def test_interrupted_saves_never_load_as_complete(two_rank_run):
    for name in ("interrupted", "overwritten"):
        path = os.path.join(two_rank_run, name)
        with pytest.raises(tdcp.IncompleteCheckpointError, match="incomplete"):
            tdcp.DTDRReader(path).read_metadata()
        with raises("incomplete"):
            _one_process_load(path)
        rep = tdcp.verify_checkpoint(path)
        assert rep.unreadable and rep.exit_code == 3
    # the overwritten one: all new shards are there, yet no metadata
    assert sorted(os.listdir(os.path.join(two_rank_run, "overwritten"))) == ["__0_0.dtdr", "__1_0.dtdr"]
    # the IncompleteCheckpointError is typed: a CheckpointNotFoundError and a FileNotFoundError
    assert issubclass(tdcp.IncompleteCheckpointError, CheckpointNotFoundError)
    assert issubclass(tdcp.IncompleteCheckpointError, FileNotFoundError)


def _copy_tree(src: str, dst: str) -> str:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_zeroed_4k_region_in_any_shard_loads_bit_exact(two_rank_run, tmp_path):
    path = _copy_tree(os.path.join(two_rank_run, "ckpt"), str(tmp_path / "ckpt"))
    files = sorted(f for f in os.listdir(path))
    assert len(files) == 4
    for f in files:
        p = os.path.join(path, f)
        with open(p, "rb") as fh:
            original = fh.read()
        size = len(original)
        # unaligned regions (two chunks hit): the head, the data, the footer; then the trailer page
        for start in (1000, size // 2 + 123, size - 3 * 4096 - 7, size - 4096):
            zero_range(p, start, min(4096, size - start))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch_dtdr.errors.DamageWarning)
                check_state(_one_process_load(path, errors="strict"))
            with open(p, "wb") as fh:
                fh.write(original)
        zero_range(p, size // 3, 4096)
        rep = tdcp.verify_checkpoint(path)
        assert rep.exit_code in (0, 1) and rep.exact and not rep.problems, (f, str(rep))
        with open(p, "wb") as fh:
            fh.write(original)
    assert tdcp.verify_checkpoint(path).exit_code == 0


# --------------------------------------------------------------------------- single process


def _save(sd, path, **kw):
    with warnings.catch_warnings():
        _quiet_dcp()
        dcp.save(sd, storage_writer=tdcp.DTDRWriter(path, **kw))


def _plain_state() -> dict:
    f = full_state()
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in f.items()}


def test_metadata_is_json_not_pickle(tmp_path):
    path = str(tmp_path / "ck")
    _save(_plain_state(), path)
    for name in tdcp.METADATA_NAMES:
        with torch_dtdr.open(os.path.join(path, name)) as f:
            meta = f.metadata()
            data = f.get_tensor("dcp_metadata").numpy().tobytes()
        doc = json.loads(data)
        assert doc["format"] == "torch_dtdr.dcp" and doc["version"] == 1
        assert meta["xxh3"] == f"{torch_dtdr.integrity.checksum.hash64(data):016x}"
        assert [fqn for fqn, _ in doc["state_dict"]] == ["w", "e", "h", "r", "s", "extra.step", "extra.name",
                                                         "extra.lrs", "extra.flag"]
        assert b"\x80\x04" not in data and b"\x80\x02" not in data  # no pickle protocol header
    src = "".join(open(p, encoding="utf-8").read() for p in _dcp_sources())
    assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|marshal)\b", src, re.M)
    assert "pickle.load" not in src and "pickle.dump" not in src
    md = tdcp.read_metadata(path)
    assert md.planner_data["extra.step"] == ("extra", "step")
    assert md.state_dict_metadata["e"].properties.dtype == torch.bfloat16


def test_metadata_copy_takes_over(tmp_path):
    path = str(tmp_path / "ck")
    _save(_plain_state(), path)
    os.remove(os.path.join(path, tdcp.METADATA_NAME))
    check_state(_one_process_load(path, errors="strict"))
    rep = tdcp.verify_checkpoint(path)
    assert rep.exit_code == 1 and rep.status == "repaired"
    # both copies garbage: a typed error, not "incomplete"
    p = os.path.join(path, tdcp.METADATA_COPY_NAME)
    with open(p, "r+b") as fh:
        fh.write(os.urandom(os.path.getsize(p)))
    with pytest.raises((FormatError, IntegrityError)):
        tdcp.read_metadata(path)
    assert tdcp.verify_checkpoint(path).exit_code == 3


def test_malformed_metadata_rejected():
    good = {"format": "torch_dtdr.dcp", "version": 1, "dcp_version": None, "state_dict": [], "files": [],
            "storage": [], "planner_data": torch_dtdr.tree.flatten(None)[0], "storage_meta": None}
    assert tdcp.metadata.parse_json(json.dumps(good).encode())
    bad = [
        dict(good, version=99),
        dict(good, state_dict=[["x", {"type": "tensor", "dtype": "nope"}]]),
        dict(good, state_dict=[["x", {"type": "object"}]]),
        dict(good, files=[["../../etc/passwd", "id"]]),
        dict(good, storage=[["x", None, None, 3, "x"]]),
        dict(good, planner_data=["not", "a", "skeleton"]),
        dict(good, extra=1),
    ]
    for doc in bad:
        with pytest.raises(FormatError):
            tdcp.metadata.plain_to_metadata(tdcp.metadata.parse_json(json.dumps(doc).encode()))
    with pytest.raises(FormatError):
        tdcp.metadata.parse_json(b'{"format": "torch_dtdr.dcp", "format": 1}')
    with pytest.raises(FormatError):
        tdcp.metadata.parse_json(b'{"version": NaN}')


def test_damage_modes_and_reports(tmp_path):
    from torch_dtdr.format.reader import ContainerReader
    from torch_dtdr.storage import open_source

    path = str(tmp_path / "ck")
    _save(_plain_state(), path, parity="off")
    shard = os.path.join(path, "__0_0.dtdr")
    with torch_dtdr.open(shard) as f:
        assert f.codec("w@0,0") == "dtdr" and f.codec("extra.name") == "raw" and f.codec("r@0,0") == "raw"
    with open_source(shard) as src:
        r = ContainerReader(src)
        rec = next(t for t in r.tensors if t.name == "w@0,0").records[0]
        (lo, hi), = r.physical([(rec.body_start, rec.end)])
    # no parity: damage inside "w" degrades it; recover warns and reports, strict raises
    zero_range(shard, (lo + hi) // 2, 1024)
    reader = tdcp.DTDRReader(path)
    target = _plain_state()
    with pytest.warns(torch_dtdr.errors.DamageWarning, match="1 degraded"):
        with warnings.catch_warnings():
            _quiet_dcp()
            dcp.load(target, storage_reader=reader)
    rep = reader.report()
    assert rep.status == "degraded" and rep.exit_code == 2
    assert [t.name for t in rep.tensors if t.status == "degraded"] == ["__0_0.dtdr:w@0,0"]
    assert (target["w"] - full_state()["w"]).abs().max() < 1e-3  # bounded, not garbage
    check_state({k: v for k, v in target.items() if k != "w"}, {k: v for k, v in full_state().items() if k != "w"})
    with raises("IntegrityError"):
        _one_process_load(path, errors="strict")
    rep = tdcp.verify_checkpoint(path)
    assert rep.exit_code == 2 and rep.files[0].status == "degraded"
    assert json.loads(rep.to_json())["files"][0]["status"] == "degraded"


def test_stale_shard_is_refused(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _save(_plain_state(), a)
    _save(_plain_state(), b)
    os.replace(os.path.join(b, "__0_0.dtdr"), os.path.join(a, "__0_0.dtdr"))
    with raises("another save"):
        _one_process_load(a)
    rep = tdcp.verify_checkpoint(a)
    assert rep.exit_code == 2 and any("another save" in p for p in rep.problems)
    os.remove(os.path.join(a, "__0_0.dtdr"))
    rep = tdcp.verify_checkpoint(a)
    assert any("missing" in p for p in rep.problems)


def test_unsafe_byte_items_need_allow_pickle(tmp_path):
    path = str(tmp_path / "ck")
    sd = {"t": torch.ones(3), "obj": io.BytesIO(b"payload")}  # BytesIO is not weights_only-loadable
    _save(sd, path)
    with raises("allow_pickle"):
        with warnings.catch_warnings():
            _quiet_dcp()
            dcp.load({"t": torch.zeros(3), "obj": None}, storage_reader=tdcp.DTDRReader(path))
    out = {"t": torch.zeros(3), "obj": None}
    with warnings.catch_warnings():
        _quiet_dcp()
        dcp.load(out, storage_reader=tdcp.DTDRReader(path, allow_pickle=True))
    assert out["obj"].getvalue() == b"payload" and torch.equal(out["t"], torch.ones(3))


def test_memory_fsspec_url():
    url = "memory://dtdr-dcp-test/ck"
    _save(_plain_state(), url, codec={"w": "dtdr8"})
    got = _one_process_load(url)
    check_state({k: v for k, v in got.items() if k != "w"}, {k: v for k, v in full_state().items() if k != "w"})
    assert (got["w"] - full_state()["w"]).abs().max() < 1e-2  # dtdr8: lossy, by pattern on the fqn
    assert tdcp.verify_checkpoint(url).exit_code == 0
    assert tdcp.is_checkpoint(url)


def test_s3(s3_bucket):
    base, opts = s3_bucket
    url = f"{base}/runs/ck"
    _save(_plain_state(), url, storage_options=opts)
    check_state(_one_process_load(url, storage_options=opts, errors="strict"))
    rep = tdcp.verify_checkpoint(url, storage_options=opts)
    assert rep.exit_code == 0 and len(rep.files) == 1


def test_converters_round_trip(tmp_path):
    path = str(tmp_path / "ck")
    sd = _plain_state()
    sd["nested"] = {"a": {"b": torch.arange(5)}, "lst": [torch.ones(2), 3]}
    _save(sd, path)
    out = str(tmp_path / "one.dtdr")
    tdcp.dcp_to_dtdr(path, out)
    obj = torch_dtdr.load(out, errors="strict")
    assert obj["extra"] == full_state()["extra"]
    assert_same(obj["nested"]["a"]["b"], torch.arange(5))
    assert obj["nested"]["lst"][1] == 3
    check_state({k: v for k, v in obj.items() if k != "nested"})
    back = str(tmp_path / "back")
    tdcp.dtdr_to_dcp(out, back)
    check_state(_one_process_load(back, errors="strict"))
    # a standard DCP checkpoint (pickled metadata) only with allow_pickle
    std = str(tmp_path / "std")
    with warnings.catch_warnings():
        _quiet_dcp()
        dcp.save(_plain_state(), storage_writer=dcp.FileSystemWriter(std))
    assert tdcp.dcp_kind(std) == "torch" and tdcp.dcp_kind(path) == "dtdr" and tdcp.dcp_kind(out) is None
    with pytest.raises(FormatError, match="pickle"):
        tdcp.dcp_to_dtdr(std, str(tmp_path / "x.dtdr"))
    tdcp.dcp_to_dtdr(std, str(tmp_path / "x.dtdr"), allow_pickle=True)
    check_state(torch_dtdr.load(str(tmp_path / "x.dtdr")))


def test_cli_dcp_convert(tmp_path):
    from torch_dtdr import cli

    path = str(tmp_path / "ck")
    _save(_plain_state(), path)
    out = str(tmp_path / "one.dtdr")
    assert cli.main(["dcp-convert", path, out]) == 0
    check_state(torch_dtdr.load(out))
    back = str(tmp_path / "back")
    assert cli.main(["dcp-convert", out, back, "--codec", "raw", "--parity", "16,4", "--errors", "recover"]) == 0
    check_state(_one_process_load(back))
    assert cli.main(["dcp-convert", str(tmp_path / "missing"), str(tmp_path / "y.dtdr"), "--to", "dtdr"]) == 3


def test_module_import_stays_light():
    """`dtdr` loads this module for its subcommands: importing DCP (seconds) must wait until it is used."""
    import ast

    eager = [os.path.join(os.path.dirname(tdcp.__file__), f"{name}.py") for name in ("__init__", "metadata", "verify",
                                                                                    "convert")]
    for node in (node for path in eager for node in ast.parse(open(path, encoding="utf-8").read()).body):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        assert not any(n.startswith("torch.distributed") for n in names), names


def test_rank_local_metadata_and_overwrite(tmp_path):
    path = str(tmp_path / "ck")
    with warnings.catch_warnings():
        _quiet_dcp()
        dcp.save(_plain_state(), storage_writer=tdcp.DTDRWriter(path), use_collectives=False)
    assert sorted(os.listdir(path)) == ["__0.metadata.copy.dtdr", "__0.metadata.dtdr", "__0_0.dtdr"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP logs the failed global-metadata read before falling back
        check_state(_one_process_load(path, errors="strict"))
    rep = tdcp.verify_checkpoint(path)
    assert rep.exit_code == 0 and len(rep.metadata) == 2
    _save(_plain_state(), str(tmp_path / "b"))
    with raises("overwrite=False"):
        _save(_plain_state(), str(tmp_path / "b"), overwrite=False)


def test_verify_dispatches_on_folders(two_rank_run, tmp_path):
    """torch_dtdr.verify and `dtdr verify` take a DCP checkpoint folder (api.verify -> dcp.verify_checkpoint)."""
    from torch_dtdr import cli

    path = os.path.join(two_rank_run, "ckpt")
    assert tdcp.is_checkpoint(path) and not tdcp.is_checkpoint(os.path.join(path, "__0_0.dtdr"))
    rep = torch_dtdr.verify(path)
    assert isinstance(rep, tdcp.CheckpointReport) and rep.exit_code == 0
    assert len(rep.files) == 2 and all(len(r.tensors) >= 3 for r in rep.files)
    assert cli.main(["verify", path, "--json"]) == 0
    assert cli.main(["verify", os.path.join(two_rank_run, "interrupted")]) == 3


def test_tied_tensors(tmp_path):
    """Two state-dict entries over one storage (tied weights) become one stored tensor, two names."""
    path = str(tmp_path / "ck")
    w = pseudo(40 * 8, torch.float32, 9).view(40, 8)
    _save({"embed": w, "head": w, "half": w[:20]}, path)
    with torch_dtdr.open(os.path.join(path, "__0_0.dtdr")) as f:
        assert set(f.keys()) >= {"embed@0,0", "head@0,0", "half@0,0"}
    out = {"embed": torch.zeros(40, 8), "head": torch.zeros(40, 8), "half": torch.zeros(20, 8)}
    with warnings.catch_warnings():
        _quiet_dcp()
        dcp.load(out, storage_reader=tdcp.DTDRReader(path, errors="strict"))
    assert_same(out["embed"], w)
    assert_same(out["head"], w)
    assert_same(out["half"], w[:20])
    rep = tdcp.verify_checkpoint(path)
    assert rep.exit_code == 0 and not rep.problems, str(rep)


def test_reader_fetches_only_the_ranges_it_needs(two_rank_run):
    """Loading one small tensor out of a two-rank checkpoint reads a small part of the shard files."""
    path = os.path.join(two_rank_run, "ckpt")
    total = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.startswith("__"))
    reader = tdcp.DTDRReader(path, errors="strict")
    out = {"e": torch.zeros(37, 20, dtype=torch.bfloat16)}
    with warnings.catch_warnings():
        _quiet_dcp()
        dcp.load(out, storage_reader=reader)
    assert_same(out["e"], full_state()["e"])
    assert len(reader.report().files) == 2  # "e" was sharded over both ranks
    assert 0 < reader.bytes_read < total / 3, (reader.bytes_read, total)


def test_dtdr_convert_routes_dcp_folders(tmp_path):
    """`torch_dtdr.convert` gathers a DCP folder into one file and writes one back."""
    import torch_dtdr
    from torch_dtdr.convert import convert

    sd = {"w": torch.arange(12, dtype=torch.float32).view(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)}
    single = tmp_path / "one.dtdr"
    torch_dtdr.save(sd, single)
    folder = tmp_path / "ckpt"
    assert convert(single, folder, to="dcp")["to"] == "dcp"
    back_file = tmp_path / "back.dtdr"
    assert convert(folder, back_file)["from"] == "dcp"
    back = torch_dtdr.load(back_file, errors="strict")
    for k, v in sd.items():
        assert torch.equal(back[k], v) and back[k].dtype == v.dtype
    assert torch_dtdr.verify(str(folder)).exit_code == 0
