"""torch_dtdr.storage against real back-ends: local files, memory://, S3 (moto
server) and GCS (gcp-storage-emulator). Nothing here mocks fsspec."""

from __future__ import annotations

import array
import hashlib
import io
import os
import random
import stat
import threading
import time
import uuid
from dataclasses import dataclass

import fsspec
import pytest

from torch_dtdr import storage
from torch_dtdr.errors import CheckpointNotFoundError, StorageError
from torch_dtdr.storage import exists, open_sink, open_source, read_bytes, remove, write_bytes_atomic

MiB = 2**20


def _data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@dataclass
class Store:
    kind: str
    base: str
    options: dict | None

    def url(self, name: str) -> str:
        return os.path.join(self.base, name) if self.kind == "local" else f"{self.base}/{name}"

    def names(self) -> set:
        """Every file under the store's base, temporary ones included."""
        if self.kind == "local":
            return set(os.listdir(self.base))
        fs, path = fsspec.core.url_to_fs(self.base, **(self.options or {}))
        fs.invalidate_cache()
        return {p.rsplit("/", 1)[-1] for p in fs.find(path)}


@pytest.fixture(params=["local", "memory", "s3", "gcs"])
def store(request, tmp_path):
    kind = request.param
    if kind == "local":
        yield Store(kind, str(tmp_path), None)
    elif kind == "memory":
        base = f"memory://dtdr-test-{uuid.uuid4().hex}"
        yield Store(kind, base, None)
        fs = fsspec.filesystem("memory")
        if fs.exists(base):
            fs.rm(base, recursive=True)
    else:
        base, options = request.getfixturevalue(f"{kind}_bucket")
        yield Store(kind, base, options)


# --------------------------------------------------------------------------- all back-ends


def test_write_then_read_back(store):
    data = _data(3 * MiB + 17)
    url = store.url("model.dtdr")
    assert not exists(url, store.options)
    assert write_bytes_atomic(url, data, store.options) == len(data)
    assert exists(url, store.options)
    assert read_bytes(url, store.options) == data
    with open_source(url, store.options) as src:
        assert src.size == len(data)
        assert src.name == url
    assert store.names() == {"model.dtdr"}


def test_empty_file(store):
    url = store.url("empty")
    write_bytes_atomic(url, b"", store.options)
    with open_source(url, store.options) as src:
        assert src.size == 0
        assert src.read(0, 10) == b""
        assert src.read_ranges([(0, 5), (3, 0)], max_workers=4) == [b"", b""]


def test_range_reads_and_eof(store):
    data = _data(100_000, seed=1)
    url = store.url("ranges")
    write_bytes_atomic(url, data, store.options)
    with open_source(url, store.options) as src:
        for off, n in [(0, 1), (0, 100_000), (12_345, 6_789), (99_999, 1), (5, 0)]:
            assert src.read(off, n) == data[off : off + n]
        # past EOF: what exists, then nothing
        assert src.read(99_990, 100) == data[99_990:]
        assert src.read(100_000, 10) == b""
        assert src.read(10**9, 10) == b""
        assert src.head(16) == data[:16]
        assert src.tail(16) == data[-16:]
        assert src.tail(10**6) == data
        with pytest.raises(ValueError):
            src.read(-1, 4)
        with pytest.raises(ValueError):
            src.read(0, -4)
        expected = 1 + 100_000 + 6_789 + 1 + 10 + 16 + 16 + 100_000
        assert src.bytes_read == expected
    with pytest.raises(ValueError):
        src.read(0, 1)  # closed


def test_read_ranges_equals_sequential(store):
    data = _data(2 * MiB + 3, seed=2)
    url = store.url("ranges")
    write_bytes_atomic(url, data, store.options)
    rng = random.Random(3)
    ranges = [(rng.randrange(len(data)), rng.randrange(300_000)) for _ in range(24)]
    ranges += [(0, len(data)), (len(data) - 5, 50), (len(data), 7), (42, 0)]
    with open_source(url, store.options) as src:
        sequential = [src.read(o, n) for o, n in ranges]
        before = src.bytes_read
        concurrent = src.read_ranges(ranges, max_workers=8, part_size=64 * 1024)
        assert concurrent == sequential
        assert concurrent == [data[o : o + n] for o, n in ranges]
        assert src.bytes_read == 2 * before
        assert src.read_ranges(ranges, max_workers=1) == sequential


def test_read_into_scatters_exactly_what_read_returns(store):
    """read_into fills several buffers in order (the reader's data pieces and parity gaps),
    stops at the end of the file and counts what it read, on every back-end."""
    data = _data(300_001, seed=4)
    url = store.url("scatter")
    write_bytes_atomic(url, data, store.options)
    rng = random.Random(5)
    with open_source(url, store.options) as src:
        for offset in (0, 17, 4096, len(data) - 100_000, len(data) - 3, len(data)):
            sizes = [rng.randrange(0, 40_000) for _ in range(rng.randrange(1, 9))]
            buffers = [bytearray(b"\xee" * n) for n in sizes]
            before = src.bytes_read
            got = src.read_into(offset, [memoryview(b) for b in buffers])
            want = data[offset: offset + sum(sizes)]
            assert got == len(want) and src.bytes_read - before == got
            filled = b"".join(buffers)
            assert filled[:got] == want and filled[got:] == b"\xee" * (len(filled) - got)
        many = [bytearray(3) for _ in range(3000)]  # more buffers than one vectored read takes
        assert src.read_into(5, many) == 9000 and b"".join(many) == data[5:9005]


def test_local_read_into_of_a_shrunk_file_is_a_storage_error(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(_data(10_000))
    with open_source(p) as src:
        with open(p, "r+b") as f:
            f.truncate(5_000)
        with pytest.raises(StorageError) as ei:
            src.read_into(4_000, [bytearray(1_000), bytearray(1_000)])
        assert ei.value.byte_range == (4_000, 6_000)


def test_missing_path(store):
    url = store.url("does-not-exist.dtdr")
    with pytest.raises(CheckpointNotFoundError) as ei:
        open_source(url, store.options)
    assert isinstance(ei.value, FileNotFoundError)
    assert url in str(ei.value)
    with pytest.raises(CheckpointNotFoundError):
        read_bytes(url, store.options)
    with pytest.raises(CheckpointNotFoundError):
        remove(url, store.options)
    remove(url, store.options, missing_ok=True)


def test_remove(store):
    url = store.url("gone")
    write_bytes_atomic(url, b"x", store.options)
    remove(url, store.options)
    assert not exists(url, store.options)


def test_nothing_visible_before_commit(store):
    url = store.url("ckpt")
    sink = open_sink(url, store.options)
    sink.write(b"partial")
    assert not exists(url, store.options)
    sink.write(b" and the rest")
    assert sink.tell() == len(b"partial and the rest")
    sink.commit()
    assert sink.committed
    assert read_bytes(url, store.options) == b"partial and the rest"
    assert store.names() == {"ckpt"}


def test_abort_keeps_previous_file(store):
    # GCS: only a write that never started its resumable upload is aborted here:
    # the emulator answers 501 to the DELETE that cancels one, and gcsfs retries.
    url = store.url("ckpt")
    old = _data(50_000, seed=4)
    write_bytes_atomic(url, old, store.options)
    sink = open_sink(url, store.options)
    sink.write(_data(70_000, seed=5))
    sink.abort()
    sink.abort()  # idempotent
    assert sink.closed and not sink.committed
    assert read_bytes(url, store.options) == old
    assert store.names() == {"ckpt"}
    with pytest.raises(StorageError):
        sink.commit()
    with pytest.raises(ValueError):
        sink.write(b"more")


def test_exception_mid_write_leaves_nothing(store):
    url = store.url("ckpt")
    with pytest.raises(RuntimeError, match="boom"):
        with open_sink(url, store.options) as sink:
            sink.write(_data(10_000))
            raise RuntimeError("boom")
    assert not exists(url, store.options)
    assert store.names() == set()


def test_exception_mid_write_keeps_previous(store):
    url = store.url("ckpt")
    write_bytes_atomic(url, b"version 1", store.options)
    with pytest.raises(KeyError):
        with open_sink(url, store.options) as sink:
            sink.write(b"version 2, half written")
            raise KeyError("boom")
    assert read_bytes(url, store.options) == b"version 1"
    with open_sink(url, store.options) as sink:
        sink.write(b"version 3")
    assert read_bytes(url, store.options) == b"version 3"
    assert store.names() == {"ckpt"}


def test_dropped_sink_is_not_committed(store):
    url = store.url("ckpt")
    sink = open_sink(url, store.options)
    sink.write(b"never committed")
    del sink  # no reference cycle: the finalizer runs now
    assert not exists(url, store.options)
    assert store.names() == set()


def test_write_accepts_buffers(store):
    url = store.url("buffers")
    doubles = array.array("d", [1.0, 2.0, 3.0])
    with open_sink(url, store.options) as sink:
        assert sink.write(b"ab") == 2
        assert sink.write(bytearray(b"cd")) == 2
        assert sink.write(memoryview(b"xxefxx")[2:4]) == 2
        assert sink.write(doubles) == 24  # counted in bytes, not items
        assert sink.write(b"") == 0
    assert sink.tell() == 30
    assert read_bytes(url, store.options) == b"abcdef" + doubles.tobytes()


def test_write_all_appends_the_pieces_in_order(store):
    """write_all takes many pieces in one call (a local file in few writev calls, more pieces than
    IOV_MAX included); the bytes and the count are those of one write() each."""
    url = store.url("pieces")
    doubles = array.array("d", [1.0, 2.0, 3.0])
    rnd = random.Random(5)
    pieces = [b"ab", bytearray(b"cd"), memoryview(b"xxefxx")[2:4], doubles, b""]
    pieces += [_data(rnd.randrange(0, 300), seed=i) for i in range(1500)]
    with open_sink(url, store.options) as sink:
        assert sink.write(b"<") == 1
        assert sink.write_all(pieces) == sum(memoryview(p).nbytes for p in pieces)
        assert sink.write(b">") == 1
    expected = b"<" + b"".join(bytes(memoryview(p).cast("B")) for p in pieces) + b">"
    assert sink.tell() == len(expected)
    assert read_bytes(url, store.options) == expected


# --------------------------------------------------------------------------- S3 specifics


def _uploads(s3_client, bucket):
    return s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def _wait_for(condition, timeout: float = 10.0) -> None:
    """Parts go up from a background thread: wait (bounded) for ``condition``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_s3_aborted_multipart_leaves_no_upload(s3_bucket, s3_client):
    base, opts = s3_bucket
    bucket = base[len("s3://") :]
    url = f"{base}/big.dtdr"
    write_bytes_atomic(url, b"previous", opts)
    sink = open_sink(url, opts, block_size=5 * MiB)
    sink.write(_data(6 * MiB))
    sink.write(_data(6 * MiB, seed=1))
    _wait_for(lambda: len(_uploads(s3_client, bucket)) == 1)  # the multipart upload is under way
    sink.abort()
    assert _uploads(s3_client, bucket) == []
    assert read_bytes(url, opts) == b"previous"
    # an exception escaping the with block aborts the same way
    with pytest.raises(RuntimeError):
        with open_sink(f"{base}/other", opts, block_size=5 * MiB) as sink:
            sink.write(_data(11 * MiB))
            _wait_for(lambda: len(_uploads(s3_client, bucket)) == 1)
            raise RuntimeError("interrupted")
    assert _uploads(s3_client, bucket) == []
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == ["big.dtdr"]


def test_s3_streaming_write_is_memory_bounded(s3_bucket, s3_client):
    base, opts = s3_bucket
    bucket = base[len("s3://") :]
    url = f"{base}/stream.dtdr"
    block = 5 * MiB
    digest = hashlib.sha256()
    with open_sink(url, opts, block_size=block) as sink:
        base = _data(MiB)
        for i in range(40):
            chunk = i.to_bytes(8, "little") + base[8:]
            digest.update(chunk)
            sink.write(chunk)
            # s3fs holds at most one part in memory before it goes up, and the
            # hand-over to the upload thread at most one more part and a piece
            assert sink._fobj.buffer.getbuffer().nbytes < block + MiB
            assert sink._uploader._pending_bytes + len(sink._uploader._buf) <= block + MiB
        (upload,) = _uploads(s3_client, bucket)
        parts = s3_client.list_parts(Bucket=bucket, Key="stream.dtdr", UploadId=upload["UploadId"])
        assert len(parts["Parts"]) >= 5  # uploaded while writing (40 MiB written), not at commit
        assert not exists(url, opts)
    assert _uploads(s3_client, bucket) == []
    assert hashlib.sha256(read_bytes(url, opts)).digest() == digest.digest()


def test_s3_read_ranges_runs_concurrently(s3_bucket):
    base, opts = s3_bucket
    url = f"{base}/conc"
    data = _data(MiB)
    write_bytes_atomic(url, data, opts)
    with open_source(url, opts) as src:
        _check_concurrency(src, data)


def _check_concurrency(src, data):
    inflight, peak, lock = [0], [0], threading.Lock()
    real = src._read_exact

    def tracking(offset, length):
        with lock:
            inflight[0] += 1
            peak[0] = max(peak[0], inflight[0])
        try:
            time.sleep(0.02)
            return real(offset, length)
        finally:
            with lock:
                inflight[0] -= 1

    src._read_exact = tracking
    ranges = [(i * 65536, 65536) for i in range(16)]
    assert src.read_ranges(ranges, max_workers=8) == [data[o : o + n] for o, n in ranges]
    assert 2 <= peak[0] <= 8
    # one long range is split into parts fetched concurrently
    peak[0] = 0
    assert src.read_ranges([(0, MiB)], max_workers=4, part_size=128 * 1024) == [data]
    assert 2 <= peak[0] <= 4


# --------------------------------------------------------------------------- local specifics


def test_local_pathlike_and_file_url(tmp_path):
    p = tmp_path / "a.dtdr"
    write_bytes_atomic(p, b"pathlib", fsync=False)
    assert read_bytes(p.as_uri()) == b"pathlib"
    write_bytes_atomic(p.as_uri(), b"file url")
    with open_source(str(p)) as src:
        assert src.read(0, 100) == b"file url"
    assert exists(p) and exists(p.as_uri())


def test_local_temp_file_and_atomic_replace(tmp_path):
    p = tmp_path / "ckpt.dtdr"
    p.write_bytes(b"old")
    os.chmod(p, 0o640)
    sink = open_sink(p)
    sink.write(b"new content")
    (tmp,) = [n for n in os.listdir(tmp_path) if n != "ckpt.dtdr"]
    assert tmp.startswith(".ckpt.dtdr.") and tmp.endswith(storage.TEMP_SUFFIX)
    assert p.read_bytes() == b"old"
    sink.commit()
    assert os.listdir(tmp_path) == ["ckpt.dtdr"]
    assert p.read_bytes() == b"new content"
    assert stat.S_IMODE(p.stat().st_mode) == 0o640  # permissions survive the replace


def test_local_writes_through_symlink(tmp_path):
    target = tmp_path / "real.dtdr"
    target.write_bytes(b"old")
    link = tmp_path / "link.dtdr"
    link.symlink_to(target)
    write_bytes_atomic(link, b"new")
    assert link.is_symlink()
    assert target.read_bytes() == b"new"


def test_local_write_all_takes_up_partial_writes(tmp_path, monkeypatch):
    """A writev that writes less than asked for (a signal, a full disk's last bytes) is taken up again
    where it stopped, in the middle of a piece too; one that writes nothing is an error, not a loop."""
    from torch_dtdr.storage import sinks

    real_writev, calls = os.writev, []

    def short_writev(fd, views):
        calls.append(len(views))
        budget, head = 1000, []
        for mv in views:  # the real call, on at most the first 1000 bytes
            head.append(memoryview(mv)[:budget])
            budget -= head[-1].nbytes
            if not budget:
                break
        return real_writev(fd, head)

    monkeypatch.setattr(sinks, "_writev", short_writev)
    pieces = [_data(n, seed=n) for n in (10, 999, 1, 4097, 0, 3000, 1)]
    with open_sink(str(tmp_path / "f"), None) as sink:
        sink.write_all(pieces)
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)
    assert len(calls) >= sum(map(len, pieces)) // 1000
    monkeypatch.setattr(sinks, "_writev", lambda fd, views: 0)
    with pytest.raises(StorageError, match="write failed"):
        with open_sink(str(tmp_path / "g"), None) as sink:
            sink.write_all([b"abc"])
    assert not (tmp_path / "g").exists()


def test_local_errors(tmp_path):
    with pytest.raises(StorageError):
        open_sink(tmp_path / "no-such-dir" / "x.dtdr")
    with pytest.raises(StorageError):
        open_sink(tmp_path)  # a directory
    with pytest.raises(CheckpointNotFoundError):
        open_source(tmp_path)  # a directory is not a file
    assert os.listdir(tmp_path) == []


def test_local_file_shrinking_under_a_reader_is_a_storage_error(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(_data(10_000))
    with open_source(p) as src:
        with open(p, "r+b") as f:
            f.truncate(5_000)
        assert len(src.read(0, 5_000)) == 5_000
        with pytest.raises(StorageError) as ei:
            src.read(4_000, 2_000)
        assert ei.value.byte_range == (4_000, 6_000)


def test_temp_key_strategy_for_other_stores():
    # stores without a real discard() write a temporary key and move it at commit
    fs = fsspec.filesystem("memory")
    base = f"/dtdr-test-{uuid.uuid4().hex}"
    try:
        fs.pipe_file(f"{base}/ckpt", b"old")
        sink = storage.sinks._TempKeyFsspecSink(fs, f"{base}/ckpt", f"memory://{base}/ckpt", {})
        sink.write(b"new")
        assert fs.cat_file(f"{base}/ckpt") == b"old"
        sink.commit()
        assert fs.cat_file(f"{base}/ckpt") == b"new"
        sink = storage.sinks._TempKeyFsspecSink(fs, f"{base}/ckpt", f"memory://{base}/ckpt", {})
        sink.write(b"newer")
        sink.abort()
        assert fs.cat_file(f"{base}/ckpt") == b"new"
        assert [p.rsplit("/", 1)[-1] for p in fs.find(base)] == ["ckpt"]
    finally:
        fs.rm(base, recursive=True)


# --------------------------------------------------------------------------- file objects


def test_file_object_source():
    data = _data(10_000, seed=6)
    buf = io.BytesIO(data)
    with open_source(buf) as src:
        assert src.size == len(data)
        assert src.name == "<BytesIO>"
        assert src.read(9_990, 100) == data[9_990:]
        assert src.read(20_000, 1) == b""
        ranges = [(0, 10), (500, 4_000), (9_000, 5_000)]
        assert src.read_ranges(ranges, max_workers=8) == [data[o : o + n] for o, n in ranges]
    assert not buf.closed  # the caller owns it


def test_real_file_object_source(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"0123456789")
    with open(p, "rb") as f:
        src = open_source(f)
        assert src.name == str(p)
        assert src.read(3, 4) == b"3456"


def test_file_object_sink_writes_through():
    buf = io.BytesIO()
    with open_sink(buf) as sink:
        sink.write(b"abc")
        assert buf.getvalue() == b"abc"  # no atomicity for a caller's file object
    assert not buf.closed
    sink = open_sink(buf)
    sink.write(b"def")
    sink.abort()  # cannot take bytes back
    assert buf.getvalue() == b"abcdef"


def test_rejects_bad_inputs():
    with pytest.raises(TypeError):
        open_source(b"raw bytes")
    with pytest.raises(TypeError):
        open_source(io.StringIO("text"))
    with pytest.raises(TypeError):
        open_sink(io.StringIO())
    with pytest.raises(TypeError):
        open_source(12345)
    with pytest.raises(TypeError):
        exists(io.BytesIO())


# --------------------------------------------------------------------------- prefetch


class _Tracked:
    """Counts the requests a source really sends (and how many at once)."""

    def __init__(self, src, delay: float = 0.0, fail_at: int | None = None):
        self.calls: list[tuple[int, int]] = []
        self.inflight = self.peak = 0
        self.lock = threading.Lock()
        real = src._read_exact

        def tracking(offset, length):
            with self.lock:
                self.calls.append((offset, length))
                self.inflight += 1
                self.peak = max(self.peak, self.inflight)
            try:
                if delay:
                    time.sleep(delay)
                if fail_at is not None and offset <= fail_at < offset + length:
                    raise ConnectionError("injected store failure")
                return real(offset, length)
            finally:
                with self.lock:
                    self.inflight -= 1

        src._read_exact = tracking


@pytest.fixture
def s3_blob(s3_bucket):
    base, opts = s3_bucket
    url = f"{base}/prefetch-{uuid.uuid4().hex}"
    data = _data(8 * MiB, seed=7)
    write_bytes_atomic(url, data, opts)
    return url, opts, data


def test_prefetch_serves_planned_reads_from_few_requests(s3_blob):
    url, opts, data = s3_blob
    # 64 record-sized reads separated by 8 KiB parity-sized gaps
    ranges = [(i * 128 * 1024, 120 * 1024) for i in range(64)]
    with open_source(url, opts, max_workers=4, part_size=MiB) as src:
        t = _Tracked(src, delay=0.01)
        with src.prefetch(ranges) as pf:
            assert len(pf.parts) == 8  # gaps merged, cut into 1 MiB parts
            got = [src.read(o, n) for o, n in ranges]
            assert got == [data[o: o + n] for o, n in ranges]
            assert len(t.calls) == 8  # one request per part, none per read
            assert t.peak >= 2  # parts were fetched concurrently
            assert pf.held == 0  # every part dropped once fully served
            # a read the plan never covered goes to the store, correctly
            assert src.read(8 * MiB - 100, 100) == data[-100:]
            assert len(t.calls) == 9
            # a dropped part is fetched again rather than served stale
            assert src.read(0, 10) == data[:10]
            assert len(t.calls) == 10
        assert src.bytes_read == 8 * MiB - 8 * 1024 + 110  # what crossed the wire


def test_prefetch_read_ranges_and_concurrent_readers(s3_blob):
    url, opts, data = s3_blob
    ranges = [(i * 256 * 1024, 256 * 1024) for i in range(32)]
    with open_source(url, opts, max_workers=8, part_size=MiB) as src:
        t = _Tracked(src)
        with src.prefetch(ranges):
            results: dict[int, bytes] = {}

            def reader(k):
                for i in range(k, 32, 4):
                    results[i] = src.read_ranges([ranges[i]])[0]

            threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        assert [results[i] for i in range(32)] == [data[o: o + n] for o, n in ranges]
        assert len(t.calls) == 8


def test_prefetch_window_bounds_memory_and_never_stalls(s3_blob):
    url, opts, data = s3_blob
    ranges = [(i * MiB, MiB) for i in range(8)]
    with open_source(url, opts, max_workers=8, part_size=MiB) as src:
        t = _Tracked(src, delay=0.02)
        with src.prefetch(ranges, window=2 * MiB) as pf:
            time.sleep(0.2)
            assert len(t.calls) == 2 and pf.held == 2  # nothing fetched past the window
            assert src.read(0, MiB) == data[:MiB]
            assert pf.held <= 2
            # a read wider than the window gets every part it needs
            assert src.read(MiB, 7 * MiB) == data[MiB:]
        assert len(t.calls) == 8


def test_prefetch_failures_are_typed_and_later_reads_go_direct(s3_blob):
    url, opts, data = s3_blob
    with open_source(url, opts, max_workers=1, part_size=MiB) as src:
        _Tracked(src, fail_at=3 * MiB + 5)
        pf = src.prefetch([(0, 8 * MiB)])
        assert src.read(0, MiB) == data[:MiB]
        with pytest.raises(StorageError) as e:
            src.read(3 * MiB, MiB)
        assert e.value.byte_range == (3 * MiB, 4 * MiB) and url in str(e.value)
        pf.close()
        assert src.read(5 * MiB, 10) == data[5 * MiB: 5 * MiB + 10]
    assert src._prefetch_pool is None  # closing the source stops its fetch threads


def test_prefetch_is_inactive_where_reads_are_cheap(tmp_path):
    p = tmp_path / "blob"
    data = _data(MiB)
    write_bytes_atomic(p, data, fsync=False)
    with open_source(p) as src, src.prefetch([(0, MiB)]) as pf:
        assert not pf.active and pf.parts == []
        assert src.read(10, 10) == data[10:20]
    with pytest.raises(ValueError):
        open_source(p, max_workers=0)


def test_closing_a_prefetch_under_a_waiting_read_falls_back_to_a_direct_read(s3_blob):
    url, opts, data = s3_blob
    with open_source(url, opts, max_workers=1, part_size=MiB) as src:
        t = _Tracked(src, delay=0.3)
        pf = src.prefetch([(0, 2 * MiB)])  # part 0 in flight, part 1 queued behind it
        got = {}
        reader = threading.Thread(target=lambda: got.setdefault("b", src.read(MiB, MiB)))
        reader.start()
        time.sleep(0.1)
        pf.close()  # cancels the queued part the reader waits on
        reader.join(10)
        assert got["b"] == data[MiB: 2 * MiB]
        assert (MiB, MiB) in t.calls  # served by a direct read after the cancel


def test_s3_upload_failure_is_typed_and_leaves_nothing(s3_bucket, s3_client):
    """The store fails while parts go up (from the upload thread): the next
    write or the commit raises StorageError, and nothing is left behind."""
    base, opts = s3_bucket
    bucket = base[len("s3://") :]
    url = f"{base}/failing.dtdr"
    write_bytes_atomic(url, b"previous", opts)
    sink = open_sink(url, opts, block_size=5 * MiB)
    real = sink._fobj.write
    written = [0]

    def failing(data):
        written[0] += len(data)
        if written[0] > 12 * MiB:
            raise ConnectionResetError("injected: connection reset by the store")
        return real(data)

    sink._fobj.write = failing
    with pytest.raises(StorageError, match="connection reset") as e:
        with sink:
            for i in range(40):
                sink.write(_data(MiB, seed=i))
    assert e.value.file == url
    assert sink.closed and not sink.committed
    assert _uploads(s3_client, bucket) == []
    assert read_bytes(url, opts) == b"previous"
