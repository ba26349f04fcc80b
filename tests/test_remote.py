"""Checkpoints on object stores, end to end: s3:// (moto server + s3fs) and gs://
(gcp-storage-emulator + gcsfs), both real servers on 127.0.0.1 started by the
session fixtures of conftest.py. Nothing here mocks fsspec.

Covered for both stores: bit-exact round trips through every reading entry
point; lazy reads proven by the bytes the *server* sent (a counting HTTP proxy
in front of it) as well as by ``bytes_read``; concurrent range requests seen at
the server; verify / repair / ``load(errors="recover")`` of objects damaged by
``faults.corrupt`` on the URL itself; corrupt + undo; every CLI command with
``--storage-option`` (and with the environment variables the back-ends read).
Abort paths (a save that raises midway) run on S3, local and memory only: the
GCS emulator hangs on an aborted resumable upload.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import fsspec
import pytest
import torch

import torch_dtdr
from torch_dtdr import api, faults
from torch_dtdr.cli import main
from torch_dtdr.errors import DamageWarning, IntegrityError
from torch_dtdr.report import DEGRADED, EXACT, REPAIRED

from .helpers import assert_same, pseudo

MiB = 2**20
STORES = ["s3", "gcs"]


# --------------------------------------------------------------------------- helpers


@pytest.fixture(params=STORES)
def remote(request):
    """(kind, "s3://bucket" | "gs://bucket", storage_options) for each object store."""
    base, opts = request.getfixturevalue(f"{request.param}_bucket")
    return request.param, base, opts


def _endpoint(kind: str, opts: dict) -> str:
    return opts["client_kwargs"]["endpoint_url"] if kind == "s3" else opts["endpoint_url"]


def _with_endpoint(kind: str, opts: dict, endpoint: str) -> dict:
    out = json.loads(json.dumps(opts))
    if kind == "s3":
        out["client_kwargs"]["endpoint_url"] = endpoint
    else:
        out["endpoint_url"] = endpoint
    return out


def _fs(url: str, opts: dict):
    fs, path = fsspec.core.url_to_fs(url, **opts)
    fs.invalidate_cache()
    return fs, path


def _sha(url: str, opts: dict) -> str:
    fs, path = _fs(url, opts)
    return hashlib.sha256(fs.cat_file(path)).hexdigest()


def _keys(url_base: str, opts: dict) -> set:
    fs, path = _fs(url_base, opts)
    return {p.rsplit("/", 1)[-1] for p in fs.find(path)}


def _state_dict(n: int = 32 * 1024) -> dict:
    """Mixed dtypes, nested containers and plain values (a training-checkpoint shape)."""
    return {
        "model": {
            "w_fp32": pseudo(n, torch.float32, 1).view(-1, 256),
            "w_bf16": pseudo(n, torch.bfloat16, 2).view(256, -1),
            "w_fp16": pseudo(n, torch.float16, 3),
            "bias": pseudo(64, torch.float32, 4),
            "steps": torch.arange(10, dtype=torch.int64),
            "mask": torch.arange(37) % 3 == 0,
        },
        "step": 1234,
        "lr": 3e-4,
        "name": "run-7",
        "extras": [pseudo(5, torch.float32, 6), (1, 2.5, None)],
    }


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def _assert_same_obj(a, b):
    ta, tb = dict(_tensors(a)), dict(_tensors(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert_same(ta[k], tb[k])
    assert a["step"] == b["step"] and a["lr"] == b["lr"] and a["name"] == b["name"]
    assert tuple(b["extras"][1]) == (1, 2.5, None)


class CountingProxy:
    """A pass-through HTTP proxy in front of a storage server that counts the
    response body bytes of GET requests and the peak number of ranged GETs (data
    reads, not metadata) in flight:
    the bytes a client really downloaded, measured outside the client."""

    def __init__(self, upstream: str):
        u = urlsplit(upstream)
        self._up = (u.hostname, u.port)
        self.lock = threading.Lock()
        self.get_bytes = 0
        self.gets = self.ranged_gets = 0
        self.delay = 0.0  # seconds added to each ranged GET, so overlap shows on a busy machine
        self.inflight = 0
        self.peak_inflight = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                hop = {"connection", "keep-alive", "proxy-connection", "transfer-encoding"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
                is_get = self.command == "GET"
                ranged = is_get and "range" in {k.lower() for k in self.headers}
                if ranged:
                    with proxy.lock:
                        proxy.inflight += 1
                        proxy.peak_inflight = max(proxy.peak_inflight, proxy.inflight)
                    time.sleep(proxy.delay)
                try:
                    conn = http.client.HTTPConnection(*proxy._up, timeout=60)
                    try:
                        conn.request(self.command, self.path, body=body, headers=headers)
                        resp = conn.getresponse()
                        data = resp.read()
                        rheaders = resp.getheaders()
                        status, reason = resp.status, resp.reason
                    finally:
                        conn.close()
                finally:
                    if ranged:
                        with proxy.lock:
                            proxy.inflight -= 1
                if is_get:
                    with proxy.lock:
                        proxy.gets += 1
                        proxy.ranged_gets += ranged
                        proxy.get_bytes += len(data)
                self.send_response(status, reason)
                for k, v in rheaders:
                    kl = k.lower()
                    if kl in hop or (kl == "content-length" and self.command != "HEAD"):
                        continue
                    if kl in ("server", "date"):
                        continue  # send_response wrote its own
                    self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def reset(self):
        with self.lock:
            self.get_bytes = self.gets = self.ranged_gets = self.peak_inflight = 0

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- round trips


def test_round_trip_bit_exact(remote):
    kind, base, opts = remote
    url = f"{base}/ckpt.dtdr"
    obj = _state_dict()
    torch_dtdr.save(obj, url, codec="dtdr", storage_options=opts)
    assert _keys(base, opts) == {"ckpt.dtdr"}  # no temporary objects left behind
    _assert_same_obj(obj, api.load(url, errors="strict", storage_options=opts))
    _assert_same_obj(obj, torch_dtdr.load(url, storage_options=opts))  # the torch.load-shaped shim
    with torch_dtdr.open(url, storage_options=opts) as f:
        _assert_same_obj(obj, f.load())
    assert api.verify(url, storage_options=opts).status == EXACT
    info = api.info(url, storage_options=opts)
    assert info["file_size"] == _fs(url, opts)[0].size(_fs(url, opts)[1])
    assert {t["name"] for t in info["tensors"]} == {k for k, _ in _tensors(obj)}
    # lossy codecs and overwriting an existing object
    torch_dtdr.save(obj, url, codec={"model.w_*": "dtdr8", "*": "dtdr"}, storage_options=opts)
    back = api.load(url, storage_options=opts)
    w = obj["model"]["w_fp32"]
    assert (back["model"]["w_fp32"] - w).norm() / w.norm() < 0.02
    assert_same(back["model"]["bias"], obj["model"]["bias"])


@pytest.fixture
def proxied(remote):
    """A checkpoint of ~4 MiB stored on ``remote``, and storage options that
    reach the same server through a CountingProxy."""
    kind, base, opts = remote
    url = f"{base}/big.dtdr"
    sd = {f"layer{i}.weight": pseudo(MiB, torch.float16, 10 + i).view(1024, 1024) for i in range(4)}
    sd["tiny.bias"] = pseudo(256, torch.float16, 99)
    torch_dtdr.save(sd, url, codec={"tiny.*": "dtdr", "*": "dtdr8"}, storage_options=opts)
    proxy = CountingProxy(_endpoint(kind, opts))
    try:
        yield url, sd, _with_endpoint(kind, opts, proxy.url), proxy
    finally:
        proxy.close()


def test_get_tensor_transfers_only_its_ranges_and_load_is_concurrent(proxied):
    url, sd, opts, proxy = proxied
    fs, path = _fs(url, opts)
    size = fs.size(path)
    assert size > 4 * MiB
    proxy.delay = 0.05
    proxy.reset()
    with torch_dtdr.open(url, storage_options=opts) as f:
        opened = f.bytes_read
        tiny = f.get_tensor("tiny.bias")
        small_read = f.bytes_read
        small_served = proxy.get_bytes
        big = f.get_tensor("layer2.weight")
        big_read = f.bytes_read - small_read
    assert_same(tiny, sd["tiny.bias"])
    assert torch.isfinite(big).all() and big.shape == (1024, 1024)
    # opening reads the trailer, the index and the chunk checksums; one small
    # tensor adds a chunk or two: a small fraction of the object
    assert small_read - opened <= 3 * 4096
    assert small_read < 0.02 * size, (small_read, size)
    # what the server sent matches what the reader counted (GCS also serves a
    # small JSON metadata document per stat)
    assert small_read <= small_served <= small_read + 16 * 1024, (small_read, small_served)
    assert small_served < 0.02 * size
    # a 1 Mi-element dtdr8 tensor: its own ~1 MiB of records, not the file
    assert 0.9 * MiB < big_read < 1.2 * MiB, big_read

    # a full load: several range GETs in flight at the server at once; each data
    # byte fetched once (parity, 2 of every 34 chunks, and spare footer copies are not read)
    proxy.reset()
    back = api.load(url, storage_options=opts)
    assert set(back) == set(sd)
    assert proxy.peak_inflight >= 2, proxy.peak_inflight
    assert 0.9 * size < proxy.get_bytes < 1.02 * size, (proxy.get_bytes, size)


def test_load_concurrency_is_configurable_and_requests_are_few(proxied):
    """A full load is planned: the records' ranges are merged and fetched in
    large parts ahead of the decoder, at most ``max_workers`` at once."""
    url, sd, opts, proxy = proxied
    fs, path = _fs(url, opts)
    size = fs.size(path)
    proxy.delay = 0.05
    proxy.reset()
    with torch_dtdr.open(url, storage_options=opts):
        opening = proxy.ranged_gets  # trailer, index, checksum tables
    for workers in (1, 3):
        proxy.reset()
        back = api.load(url, storage_options=opts, max_workers=workers)
        assert set(back) == set(sd)
        assert_same(back["tiny.bias"], sd["tiny.bias"])
        assert 1 <= proxy.peak_inflight <= workers, (workers, proxy.peak_inflight)
        # the data comes in parts of at least 1 MiB, not one request per record or stripe
        assert proxy.ranged_gets - opening <= -(-size // MiB), (proxy.ranged_gets, opening, size)
    assert proxy.peak_inflight >= 2
    proxy.reset()
    assert torch_dtdr.load(url, storage_options=opts, max_workers=1).keys() == sd.keys()  # the shim passes it on
    assert proxy.peak_inflight == 1
    proxy.reset()
    assert api.verify(url, storage_options=opts, max_workers=2).status == EXACT
    assert proxy.peak_inflight <= 2
    # verify checks every chunk (data, parity, head) and decodes every tensor,
    # from one download of the file: not one for each
    assert 0.9 * size < proxy.get_bytes < 1.1 * size, (proxy.get_bytes, size)
    # repair copies every record to a new object while checking it: one download too
    proxy.reset()
    healed = url.replace("big.dtdr", "healed.dtdr")
    assert api.repair(url, healed, storage_options=opts).status == EXACT
    assert 0.9 * size < proxy.get_bytes < 1.1 * size, (proxy.get_bytes, size)
    assert api.verify(healed, storage_options=opts).status == EXACT


def test_open_prefetch_plans_several_tensors_at_once(proxied):
    url, sd, opts, proxy = proxied
    wanted = ["layer3.weight", "layer1.weight", "tiny.bias"]
    with torch_dtdr.open(url, storage_options=opts) as f:
        singly = {k: f.get_tensor(k) for k in wanted}
        f.release()
        with pytest.raises(KeyError, match="no tensor named"):
            with f.prefetch(["nope"]):
                pass
        proxy.reset()
        before = f.bytes_read
        with f.prefetch(wanted):
            planned = {k: f.get_tensor(k) for k in wanted}
        moved = f.bytes_read - before
    for k in wanted:
        assert_same(planned[k], singly[k])
    # two ~1 MiB dtdr8 tensors and a small one: their bytes only, in few requests
    assert 2 * MiB < moved < 2.4 * MiB, moved
    assert proxy.ranged_gets <= 4, proxy.ranged_gets


# --------------------------------------------------------------------------- damage


def _small_ckpt(remote, name="ckpt.dtdr"):
    kind, base, opts = remote
    url = f"{base}/{name}"
    sd = {"a": pseudo(64 * 1024, torch.float32, 21), "b": pseudo(64 * 1024, torch.bfloat16, 22),
          "c": pseudo(1000, torch.float32, 23)}
    torch_dtdr.save(sd, url, codec="dtdr", storage_options=opts)
    return url, sd, opts


def test_damaged_object_verify_repair_load(remote):
    kind, base, opts = remote
    url, sd, opts = _small_ckpt(remote)
    clean_sha = _sha(url, opts)
    # one zeroed 4 KiB sector inside tensor "a", written back to the object itself
    rec = faults.corrupt(url, mode="zero-sectors", count=1, seed=3, region="tensor:a", storage_options=opts)
    assert rec.n_bytes_differing > 0 and _sha(url, opts) == rec.damaged_sha256 != clean_sha
    rep = api.verify(url, storage_options=opts)
    assert rep.status == REPAIRED and rep.exit_code == 1, rep.summary()
    with pytest.warns(DamageWarning):
        back = api.load(url, errors="recover", storage_options=opts)
    for k in sd:
        assert_same(back[k], sd[k])
    # repair into a new object: atomic, verifies clean, the damaged one untouched
    out = f"{base}/healed.dtdr"
    api.repair(url, out, storage_options=opts, out_storage_options=opts)
    assert api.verify(out, storage_options=opts).status == EXACT
    assert _sha(url, opts) == rec.damaged_sha256
    # repair in place replaces the object
    api.repair(url, storage_options=opts)
    assert api.verify(url, storage_options=opts).status == EXACT
    for k, v in api.load(url, errors="strict", storage_options=opts).items():
        assert_same(v, sd[k])
    assert _keys(base, opts) == {"ckpt.dtdr", "healed.dtdr"}


def test_heavily_damaged_object_degrades(remote):
    kind, base, opts = remote
    url, sd, opts = _small_ckpt(remote)
    # ~1 byte in 100 replaced over all of "b": every chunk of its stripes is hit,
    # and most byte columns more than once: far more than parity (2 chunks per
    # stripe, or one wrong byte per column) can repair
    faults.corrupt(url, mode="replace", fraction=1e-2, seed=5, region="tensor:b", storage_options=opts)
    rep = api.verify(url, storage_options=opts)
    assert rep.status == DEGRADED and rep.exit_code == 2, rep.summary()
    with pytest.raises(IntegrityError):
        api.load(url, errors="strict", storage_options=opts)
    with pytest.warns(DamageWarning):
        back = api.load(url, errors="recover", storage_options=opts)
    assert all(torch.isfinite(v.float()).all() for v in back.values())
    assert_same(back["a"], sd["a"])
    b, ref = back["b"].double(), sd["b"].double()
    assert ((b - ref).norm() / ref.norm()).item() < 0.5
    # a degraded object is still repaired into a self-consistent one, which keeps saying degraded
    out = f"{base}/healed.dtdr"
    rep2 = api.repair(url, out, storage_options=opts, out_storage_options=opts)
    assert rep2.status == DEGRADED
    healed = api.verify(out, storage_options=opts)
    assert healed.status == DEGRADED and not healed.events and not healed.truncated
    assert {t.name: t.status for t in healed.tensors}["a"] == EXACT
    # and in place only when asked to
    with pytest.raises(IntegrityError):
        api.repair(url, storage_options=opts)


def test_corrupt_and_undo_restore_sha256(remote):
    kind, base, opts = remote
    url, sd, opts = _small_ckpt(remote)
    clean = _sha(url, opts)
    for mode, kw in (("bitflip", {"fraction": 1e-4}), ("burst", {"count": 3}), ("truncate", {"count": 5000})):
        rec = faults.corrupt(url, mode=mode, seed=11, storage_options=opts, **kw)
        assert rec.original_sha256 == clean and _sha(url, opts) == rec.damaged_sha256 != clean
        assert faults.undo(rec, storage_options=opts) == rec.target
        assert _sha(url, opts) == clean
    # damage into a copy leaves the original untouched
    copy = f"{base}/copy.dtdr"
    rec = faults.corrupt(url, mode="zero-sectors", count=2, seed=1, out=copy, storage_options=opts)
    assert _sha(url, opts) == clean and _sha(copy, opts) == rec.damaged_sha256
    faults.undo(rec, storage_options=opts)
    assert _sha(copy, opts) == clean


# --------------------------------------------------------------------------- CLI


def _cli_options(kind: str, opts: dict) -> list[str]:
    args = []
    for k, v in opts.items():
        args += ["--storage-option", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    return args


def test_cli_with_storage_options(remote, tmp_path, capsys):
    kind, base, opts = remote
    url, sd, opts = _small_ckpt(remote)
    so = _cli_options(kind, opts)
    clean = _sha(url, opts)

    assert main(["info", url, "--json", *so]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {t["name"] for t in info["tensors"]} == set(sd)
    assert main(["verify", url, "--json", *so]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == EXACT

    record = tmp_path / "rec.json"
    assert main(["corrupt", url, "--mode", "zero-sectors", "--count", "1", "--seed", "2", "--region", "tensor:a",
                 "--record", str(record), *so]) == 0
    capsys.readouterr()
    assert _sha(url, opts) != clean
    assert main(["verify", url, "--json", "--max-workers", "3", *so]) == 1  # repaired by parity
    capsys.readouterr()
    out = f"{base}/healed.dtdr"
    assert main(["repair", url, "-o", out, "--max-workers", "2", *so]) == 0
    capsys.readouterr()
    assert main(["verify", out, *so]) == 0
    assert main(["undo", str(record), *so]) == 0
    capsys.readouterr()
    assert _sha(url, opts) == clean

    # convert: safetensors object -> DTDR object -> safetensors object
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    fs, path = _fs(base, opts)
    fs.pipe_file(f"{path}/model.safetensors", st_save(sd))
    assert main(["convert", f"{base}/model.safetensors", f"{base}/model.dtdr", "--json", *so]) == 0
    capsys.readouterr()
    for k, v in api.load(f"{base}/model.dtdr", errors="strict", storage_options=opts).items():
        assert_same(v, sd[k])
    assert main(["convert", f"{base}/model.dtdr", f"{base}/back.safetensors", *so]) == 0
    capsys.readouterr()
    fs.invalidate_cache()
    for k, v in st_load(fs.cat_file(f"{path}/back.safetensors")).items():
        assert_same(v, sd[k])


def test_cli_repair_across_stores(s3_bucket, gcs_bucket, capsys):
    """`dtdr repair s3://... -o gs://...`: --storage-option for the source,
    --output-storage-option for the destination."""
    url, sd, s3_opts = _small_ckpt(("s3", *s3_bucket))
    gbase, gcs_opts = gcs_bucket
    faults.corrupt(url, mode="zero-sectors", count=1, seed=4, region="tensor:a", storage_options=s3_opts)
    out = f"{gbase}/healed.dtdr"
    assert main(["repair", url, "-o", out, *_cli_options("s3", s3_opts),
                 *[a.replace("--storage-option", "--output-storage-option") for a in _cli_options("gcs", gcs_opts)]]) == 0
    capsys.readouterr()
    assert api.verify(out, storage_options=gcs_opts).status == EXACT
    for k, v in api.load(out, errors="strict", storage_options=gcs_opts).items():
        assert_same(v, sd[k])


def test_cli_sweep_reads_a_remote_checkpoint(s3_bucket, tmp_path, capsys):
    base, opts = s3_bucket
    url = f"{base}/small.dtdr"
    torch_dtdr.save({"w": pseudo(4096, torch.float16, 1).view(64, 64)}, url, codec="dtdr", storage_options=opts)
    out = tmp_path / "sweep"
    assert main(["sweep", url, "--fractions", "1e-4", "--seeds", "1", "--formats", "dtdr8", "--workers", "1",
                 "--no-progress", "--out", str(out), *_cli_options("s3", opts)]) == 0
    capsys.readouterr()
    assert (out / "sweep.csv").exists() and (out / "summary.md").exists()


def test_cli_reads_the_backends_environment_variables(remote, monkeypatch, capsys):
    """No endpoint on the command line: botocore reads AWS_ENDPOINT_URL_S3 (the
    keys come from the AWS_* variables the fixture set), gcsfs reads
    STORAGE_EMULATOR_HOST."""
    kind, base, opts = remote
    url, sd, opts = _small_ckpt(remote)
    if kind == "s3":
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", _endpoint(kind, opts))
        so = ["--storage-option", "use_listings_cache=false"]  # keys, secret, region, endpoint: environment
    else:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", _endpoint(kind, opts))
        so = ["--storage-option", "token=anon"]
    assert main(["verify", url, *so]) == 0
    fs, path = fsspec.core.url_to_fs(url, **opts)
    size = f"{fs.size(path) / 1024:.1f}"  # the object's size in KiB, as the CLI prints it
    assert capsys.readouterr().out.split()[:4] == [url, size, "KiB", "clean"]  # one line: path, size, status


# --------------------------------------------------------------------------- atomic saves


def _uploads(s3_client, bucket):
    return s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


class Interrupted(Exception):
    pass


def _codec_failing_on(victim: str, fail):
    """A codec callable for ``save``: "raw" for every tensor, except that
    ``victim`` gets a raw codec whose ``encode`` calls ``fail()`` (``save``
    picks every codec before it writes, so the failure comes mid-write)."""
    from torch_dtdr.codecs.raw import Raw

    class FailingRaw(Raw):
        def encode(self, x):
            fail()
            return super().encode(x)

    failing = FailingRaw()

    def codec(name, tensor):
        return failing if name == victim else "raw"

    return codec


@pytest.mark.parametrize("exc", [Interrupted, KeyboardInterrupt])
def test_interrupted_save_to_s3_leaves_nothing(s3_bucket, s3_client, exc):
    base, opts = s3_bucket
    bucket = base[len("s3://"):]
    # 5 MiB parts (S3's minimum) so that parts are already uploaded when the save fails
    opts = dict(opts, default_block_size=5 * MiB)
    prev = {"w": pseudo(1000, torch.float32, 1)}
    torch_dtdr.save(prev, f"{base}/prev.dtdr", codec="raw", storage_options=opts)
    prev_etag = s3_client.head_object(Bucket=bucket, Key="prev.dtdr")["ETag"]
    sd = {f"t{i}": pseudo(MiB, torch.float32, i) for i in range(3)}  # 4 MiB each, raw
    seen = {}

    def fail():
        # save may encode ahead on worker threads: hold the failure until the
        # writer has pushed t0 and t1 (8 MiB) and a 5 MiB part is up
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ups = _uploads(s3_client, bucket)
            if ups and s3_client.list_parts(Bucket=bucket, Key=ups[0]["Key"],
                                            UploadId=ups[0]["UploadId"]).get("Parts"):
                break
            time.sleep(0.05)
        seen["uploads"] = len(ups)
        raise exc("interrupted mid-save")

    # the codec callable picks, for "t2", a codec whose encode raises: the save
    # fails after ~8 MiB of records went to the sink (one 5 MiB part uploaded)
    codec = _codec_failing_on("t2", fail)

    for key in ("new.dtdr", "prev.dtdr") if exc is Interrupted else ("prev.dtdr",):
        with pytest.raises(exc):
            torch_dtdr.save(sd, f"{base}/{key}", codec=codec, storage_options=opts)
        assert seen.pop("uploads") == 1  # a multipart upload with parts was under way
        assert _uploads(s3_client, bucket) == []  # ... and was aborted
        keys = sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", []))
        assert keys == ["prev.dtdr"]  # no partial object, no temporary key
    assert s3_client.head_object(Bucket=bucket, Key="prev.dtdr")["ETag"] == prev_etag
    assert_same(api.load(f"{base}/prev.dtdr", errors="strict", storage_options=opts)["w"], prev["w"])


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_interrupted_save_local_and_memory(kind, tmp_path):
    import uuid

    if kind == "local":
        base, listdir = str(tmp_path), lambda: sorted(os.listdir(tmp_path))
    else:
        base = f"memory://dtdr-remote-{uuid.uuid4().hex}"
        mfs = fsspec.filesystem("memory")

        def listdir():
            return sorted(p.rsplit("/", 1)[-1] for p in mfs.find(base))
    prev = {"w": pseudo(1000, torch.float32, 1)}
    torch_dtdr.save(prev, f"{base}/prev.dtdr", codec="raw")
    before = torch_dtdr.storage.read_bytes(f"{base}/prev.dtdr")

    def fail():
        raise Interrupted()

    codec = _codec_failing_on("t2", fail)
    sd = {f"t{i}": pseudo(256 * 1024, torch.float32, i) for i in range(4)}
    for key in ("new.dtdr", "prev.dtdr"):
        with pytest.raises(Interrupted):
            torch_dtdr.save(sd, f"{base}/{key}", codec=codec)
        assert listdir() == ["prev.dtdr"]
    assert torch_dtdr.storage.read_bytes(f"{base}/prev.dtdr") == before
    if kind == "memory":
        mfs.rm(base, recursive=True)


def test_failed_repair_leaves_destination_untouched(s3_bucket, s3_client):
    """A lost tensor cannot be healed: repair raises and writes nothing, in
    place or to a new key."""
    base, opts = s3_bucket
    bucket = base[len("s3://"):]
    url = f"{base}/raw.dtdr"
    torch_dtdr.save({"i": torch.arange(200_000, dtype=torch.int32)}, url, parity="off", storage_options=opts)
    size = _fs(url, opts)[0].size(_fs(url, opts)[1])
    # integers are stored in 3 copies: cut the object inside the first one
    faults.corrupt(url, mode="truncate", count=size - 500_000, seed=0, storage_options=opts)
    damaged = _sha(url, opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamageWarning)
        for out in (f"{base}/out.dtdr", None):
            with pytest.raises(IntegrityError, match="lost"):
                api.repair(url, out, storage_options=opts, out_storage_options=opts)
    keys = sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", []))
    assert keys == ["raw.dtdr"] and _uploads(s3_client, bucket) == []
    assert _sha(url, opts) == damaged


def test_workers_start_largest_first_locally_and_in_file_order_from_a_store(s3_bucket, tmp_path, monkeypatch):
    """Locally the workers start with the largest tensors (no big one left for one core at the
    end); from an object store, whose prefetch downloads the file in order within a bounded
    window, they start in file order, so that no worker waits on bytes the window holds back."""
    from torch_dtdr import decoding

    base, opts = s3_bucket
    unit = decoding.INLINE_BYTES // 4  # float32 elements in INLINE_BYTES
    sd = {name: pseudo(k * unit, torch.float32, k) for name, k in (("b0", 2), ("b1", 4), ("b2", 16), ("b3", 8))}
    started = []
    real = decoding.Decoder.tensor

    def record(self, i, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            started.append(self.reader.tensors[i].name)
        return real(self, i, *args, **kwargs)

    monkeypatch.setattr(decoding.Decoder, "tensor", record)
    for where in (str(tmp_path / "m.dtdr"), f"{base}/m.dtdr"):
        torch_dtdr.save(sd, where, storage_options=opts if "://" in where else None)
        started.clear()
        back = torch_dtdr.load(where, workers=2, storage_options=opts if "://" in where else None)
        assert all(torch.equal(back[k], v) for k, v in sd.items())
        assert sorted(started) == ["b0", "b1", "b2", "b3"]
        assert set(started[:2]) == ({"b0", "b1"} if "://" in where else {"b2", "b3"}), (where, started)
