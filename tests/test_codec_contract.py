"""Every registered codec keeps the codec contract (tests/codec_contract.py); a new codec is tested here
as soon as it registers, with its defaults and with a small block size where it has one."""

from __future__ import annotations

import dataclasses

import pytest

from torch_dtdr import codecs

from .codec_contract import CodecContract


def _configurations():
    out = []
    for name in codecs.names():
        out.append((name, {}))
        fields = {f.name for f in dataclasses.fields(type(codecs.get(name)))}
        if "block_size" in fields:
            out.append((name, {"block_size": 256}))
    return out


@pytest.fixture(params=_configurations(), ids=lambda p: p[0] + "".join(f"-{k}={v}" for k, v in p[1].items()))
def configuration(request):
    return request.param


class TestEveryCodec(CodecContract):
    @pytest.fixture(autouse=True)
    def _bind(self, configuration):
        name, params = configuration
        self._make = lambda: codecs.get(name, **params)

    def codec(self):
        return self._make()


def test_every_registered_codec_is_covered():
    assert {"raw", "dtdr", "dtdr8", "dtdr16"} <= {name for name, _ in _configurations()}
