"""The helpers storage offers the rest of the package (join, listing, Location, url_to_fs) and the one
file-kind sniffer built on them, held to the same behaviour on every back-end: local files, memory://,
S3 (moto server) and GCS (emulator). tests/test_storage.py holds the sources' and sinks' own contract
on the same stores (its ``store`` fixture is shared here)."""

from __future__ import annotations

import io
import os
import struct

import pytest
import torch

import torch_dtdr
from torch_dtdr import storage
from torch_dtdr.errors import StorageError
from torch_dtdr.kinds import folder_kind, kind_of

from .test_storage import Store, store  # noqa: F401 - the fixture over every back-end


def test_join_and_listing(store: Store):
    folder = storage.join(store.base, "ckpt")
    assert storage.is_url(folder) == (store.kind != "local")
    assert not storage.exists(folder, store.options)
    storage.makedirs(folder, store.options)
    for name in ("b.bin", "a.bin"):
        storage.write_bytes_atomic(storage.join(folder, name), name.encode(), store.options)
    assert storage.isdir(folder, store.options)
    assert sorted(storage.listdir(folder, store.options)) == ["a.bin", "b.bin"]
    assert storage.read_bytes(storage.join(folder, "a.bin"), store.options) == b"a.bin"
    loc = storage.Location(folder, store.options)
    assert loc.isdir() and loc.exists() and loc.listdir() == ["a.bin", "b.bin"]
    assert loc.head(loc.child_path("b.bin"), 3) == b"b.b" and loc.cat(loc.child_path("a.bin")) == b"a.bin"
    assert loc.local == (store.kind == "local")
    fs, path = storage.url_to_fs(storage.join(folder, "a.bin"), store.options)
    assert storage.is_local_fs(fs) == (store.kind == "local") and fs.cat_file(path) == b"a.bin"


def test_kind_of_every_file_kind(store: Store):
    dtdr = store.url("m.dtdr")
    torch_dtdr.save({"w": torch.arange(6.0)}, dtdr, storage_options=store.options)
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    safetensors = store.url("m.safetensors")
    storage.write_bytes_atomic(safetensors, struct.pack("<Q", len(header)) + header + bytes(4), store.options)
    pt = store.url("m.pt")
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    storage.write_bytes_atomic(pt, buf.getvalue(), store.options)
    text = store.url("notes.txt")
    storage.write_bytes_atomic(text, b"hello, not a checkpoint", store.options)
    assert kind_of(dtdr, store.options) == "dtdr"
    assert kind_of(safetensors, store.options) == "safetensors"
    assert kind_of(pt, store.options) == "torch"
    assert kind_of(text, store.options) is None
    assert kind_of(store.url("missing.dtdr"), store.options) is None


def test_folder_kinds(store: Store):
    dcp = storage.join(store.base, "dcp")
    hf = storage.join(store.base, "hf")
    plain = storage.join(store.base, "plain")
    for folder, name in ((dcp, "metadata.dtdr"), (hf, "model.safetensors"), (plain, "readme.md")):
        storage.makedirs(folder, store.options)
        storage.write_bytes_atomic(storage.join(folder, name), b"x", store.options)
    assert folder_kind(dcp, store.options) == "dcp" and kind_of(dcp, store.options) == "dcp"
    assert folder_kind(hf, store.options) == "hf-folder"
    assert folder_kind(plain, store.options) is None
    assert folder_kind(storage.join(store.base, "missing"), store.options) is None


def test_atomic_local_path(tmp_path):
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with storage.atomic_local_path(str(dest)) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise RuntimeError("the writer failed")
    assert dest.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]
    with storage.atomic_local_path(str(dest)) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith(storage.TEMP_SUFFIX)
        with open(tmp, "wb") as f:
            f.write(b"new")
        assert dest.read_bytes() == b"old"  # nothing visible before the body ends
    assert dest.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]
    with pytest.raises(StorageError):
        with storage.atomic_local_path(str(tmp_path / "no-such-folder" / "x.bin")):
            pass


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX permissions")
def test_atomic_local_path_gives_the_usual_permissions(tmp_path):
    """A writer that creates its file 0600 (safetensors does) still leaves a file with the mode
    open(dest, "wb") would give: 0666 less the umask for a new file, the old mode for a replaced one."""
    old_umask = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.bin"
        with storage.atomic_local_path(str(fresh)) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, b"x")
            os.close(fd)
        assert os.stat(fresh).st_mode & 0o777 == 0o644
        kept = tmp_path / "kept.bin"
        kept.write_bytes(b"old")
        os.chmod(kept, 0o640)
        with storage.atomic_local_path(str(kept)) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, b"new")
            os.close(fd)
        assert os.stat(kept).st_mode & 0o777 == 0o640
    finally:
        os.umask(old_umask)
    dest = tmp_path / "saved.dtdr"
    torch_dtdr.save({"w": torch.zeros(4)}, dest)
    assert os.stat(dest).st_mode & 0o777 == 0o666 & ~old_umask
