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


def _gf_mul(a: int, b: int) -> int:
    out = 0
    while b:
        if b & 1:
            out ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
        b >>= 1
    return out


def test_footerless_miscorrected_column_never_spoils_an_intact_record():
    """Two wrong bytes in one column (slots 0 and 1 of a stripe) whose syndrome
    looks like one wrong byte in slot 5: without chunk checksums the column is
    'corrected' in slot 5, but the record there still verifies from the file's
    own bytes."""
    from torch_dtdr.integrity.parity import ErasureCode

    k, m, c = 8, 2, 4096
    sd = {f"t{i}": pseudo(1000, seed=20 + i) for i in range(40)}
    buf = io.BytesIO()
    api.save(sd, buf, codec="raw", parity=(k, m))
    data = buf.getvalue()
    with open_source(io.BytesIO(data)) as src:
        reader = ContainerReader(src)
        footer, span = reader.geometry.physical_end, reader.geometry.stripe_span
        owner = {}
        for t in reader.tensors:
            for lo, hi in reader.physical([(r.offset, r.end) for r in t.records]):
                for pos in range(lo, hi):
                    owner.setdefault(pos, t.name)
    code = ErasureCode(k, m)
    p = [[code.encode([bytes([1 if j == i else 0]) * 64 for j in range(k)])[r][0] for i in range(k)]
         for r in range(m)]
    target = (p[0][5], p[1][5])
    pair = next((e0, e1) for e0 in range(1, 256) for e1 in range(1, 256)
                if (_gf_mul(p[0][0], e0) ^ _gf_mul(p[0][1], e1), _gf_mul(p[1][0], e0) ^ _gf_mul(p[1][1], e1)) == target)
    column = 1000
    base = span  # stripe 1: tensor data only
    spot = base + 5 * c + column
    assert spot in owner and owner[spot] not in (owner[base + column], owner[base + c + column])
    damaged = bytearray(data[:footer + 100])
    damaged[base + column] ^= pair[0]
    damaged[base + c + column] ^= pair[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj, rep = api.load(io.BytesIO(bytes(damaged)), report=True)
    status = {t.name: t.status for t in rep.tensors}
    assert status[owner[spot]] == "exact", rep.summary()
    assert_same(obj[owner[spot]], sd[owner[spot]])
    for name, st in status.items():
        if st == "exact":
            assert_same(obj[name], sd[name])
