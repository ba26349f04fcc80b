"""storage.streams: file objects, text files, appends and in-place edits, on real local files and memory://."""

from __future__ import annotations

import uuid

import pytest

from torch_dtdr import storage
from torch_dtdr.errors import CheckpointNotFoundError, StorageError


def _memory_url(name: str) -> str:
    return f"memory://streams-{uuid.uuid4().hex}/{name}"


def test_open_read_streams_a_local_file_and_a_url(tmp_path):
    local = tmp_path / "a.bin"
    local.write_bytes(b"0123456789")
    with storage.open_read(local) as fh:
        assert fh.read(4) == b"0123"
        assert fh.read() == b"456789"
    assert fh.closed
    url = _memory_url("b.bin")
    storage.write_bytes_atomic(url, b"remote bytes")
    with storage.open_read(url) as fh:
        assert fh.read(6) == b"remote"


def test_open_read_of_a_missing_file_is_typed_and_names_it(tmp_path):
    missing = tmp_path / "nope.bin"
    with pytest.raises(CheckpointNotFoundError) as info:
        with storage.open_read(missing):
            pass
    assert "nope.bin" in str(info.value)
    with pytest.raises(FileNotFoundError):
        with storage.open_read(_memory_url("nope.bin")):
            pass


def test_open_read_passes_the_callers_errors_through(tmp_path):
    local = tmp_path / "a.bin"
    local.write_bytes(b"x")
    with pytest.raises(KeyError):
        with storage.open_read(local):
            raise KeyError("mine")


def test_text_round_trip_keeps_newlines_and_is_atomic(tmp_path):
    path = tmp_path / "t.csv"
    assert storage.write_text_atomic(path, "a,b\r\nü,2\n") == len("a,b\r\nü,2\n".encode())
    assert path.read_bytes() == "a,b\r\nü,2\n".encode()
    assert storage.read_text(path) == "a,b\r\nü,2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]  # no temp file left
    url = _memory_url("t.json")
    storage.write_text_atomic(url, '{"k": 1}')
    assert storage.read_text(url) == '{"k": 1}'
    with pytest.raises(CheckpointNotFoundError):
        storage.read_text(tmp_path / "missing.json")


def test_open_text_append_adds_to_the_end(tmp_path):
    path = tmp_path / "log.csv"
    with storage.open_text_append(path) as fh:
        fh.write("one\r\n")
    with storage.open_text_append(path) as fh:
        fh.write("two\r\n")
    assert path.read_bytes() == b"one\r\ntwo\r\n"
    with pytest.raises(CheckpointNotFoundError):
        with storage.open_text_append(tmp_path / "no-such-dir" / "log.csv"):
            pass
    with pytest.raises(StorageError) as info:
        with storage.open_text_append(tmp_path):  # a folder
            pass
    assert str(tmp_path) in str(info.value)


def test_patch_bytes_writes_truncates_and_appends_in_place(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abcdefghij")
    storage.patch_bytes(path, [(0, b"XY"), (5, b"Z")])
    assert path.read_bytes() == b"XYcdeZghij"
    storage.patch_bytes(path, truncate_to=4)
    assert path.read_bytes() == b"XYcd"
    storage.patch_bytes(path, append=b"tail")
    assert path.read_bytes() == b"XYcdtail"
    with pytest.raises(CheckpointNotFoundError):
        storage.patch_bytes(tmp_path / "missing.bin", append=b"x")


def test_map_for_update_changes_only_assigned_bytes(tmp_path):
    path = tmp_path / "m.bin"
    path.write_bytes(bytes(range(16)))
    with storage.map_for_update(path) as mapped:
        mapped[[1, 3, 15]] = 255
    del mapped
    data = path.read_bytes()
    assert data[1] == data[3] == data[15] == 255
    assert data[0] == 0 and data[2] == 2 and data[14] == 14
    with pytest.raises(CheckpointNotFoundError):
        with storage.map_for_update(tmp_path / "missing.bin"):
            pass
