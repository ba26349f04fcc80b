"""A file cut inside its footer (an interrupted save) has no chunk checksums,
but its stripes still carry parity and its head manifest still records the
geometry: one flipped bit in the superblock or the manifest costs nothing."""

from __future__ import annotations

import io
import warnings

import pytest

from torch_dtdr import api
from torch_dtdr.format.reader import ContainerReader
from torch_dtdr.storage import open_source

from .helpers import assert_same, pseudo


@pytest.fixture(scope="module")
def cut_file():
    sd = {f"t{i}": pseudo(20000, seed=i) for i in range(8)}
    buf = io.BytesIO()
    api.save(sd, buf)
    data = buf.getvalue()
    with open_source(io.BytesIO(data)) as src:
        footer = ContainerReader(src).geometry.physical_end
    return sd, data[:footer + 100]


@pytest.mark.parametrize("where", [None, 12, 20, 64 + 10, 64 + 80, 300, 2000])
def test_truncated_file_with_one_flipped_bit_in_its_head_loses_nothing(cut_file, where):
    sd, data = cut_file
    damaged = bytearray(data)
    if where is not None:
        damaged[where] ^= 0x10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj, rep = api.load(io.BytesIO(bytes(damaged)), report=True)
    assert rep.truncated and rep.counts()["exact"] == 8, rep.summary()
    for k, v in sd.items():
        assert_same(obj[k], v)


def test_footerless_superblock_and_manifest_both_damaged_is_a_typed_error(cut_file):
    from torch_dtdr.errors import DTDRError

    _sd, data = cut_file
    damaged = bytearray(data)
    for pos in range(0, 64 * 40, 64):  # one wrong byte in 40 columns of the same chunk and another
        damaged[pos] ^= 0xFF
        damaged[pos + 4096] ^= 0xFF
    with pytest.raises(DTDRError):
        api.load(io.BytesIO(bytes(damaged)))


def test_footerless_record_bytes_are_corrected_by_parity(cut_file):
    sd, data = cut_file
    damaged = bytearray(data)
    for pos in range(8192 + 5, 8192 + 4096 * 6, 997):  # scattered single bytes in tensor data
        damaged[pos] ^= 0x5A
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj, rep = api.load(io.BytesIO(bytes(damaged)), report=True)
    assert rep.counts()["exact"] == 8, rep.summary()
    for k, v in sd.items():
        assert_same(obj[k], v)
