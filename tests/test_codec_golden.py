"""Golden section bytes per codec configuration (tests/data/codecs/, in the spirit of numcodecs' fixtures).

The contract is the decode side: sections written by an earlier version decode to exactly the values
they decoded to when they were written (the input itself for a lossless codec), forever. The encode side
is checked for ``raw`` only: the transform codecs' encoder may change how it computes (its forward
transform's order of operations, say) while every file it ever wrote still decodes, so their golden
sections are not required to be reproduced bit for bit by today's encoder.
"""

from __future__ import annotations

import base64
import glob
import json
import os

import pytest
import torch

from torch_dtdr import codecs
from torch_dtdr.dtypes import DTYPES

from .data.make_codec_golden import CONFIGURATIONS, golden_input

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "codecs")
FILES = sorted(glob.glob(os.path.join(HERE, "*.json")))


def _load(path):
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    dtype = DTYPES[doc["dtype"]]
    raw = lambda key: base64.b64decode(doc[key])  # noqa: E731
    values = lambda data: torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype)  # noqa: E731
    sections = {k: base64.b64decode(v) for k, v in doc["sections"].items()}
    return doc, dtype, values(raw("input")), sections, values(raw("decoded"))


def test_every_configuration_has_its_golden_file():
    assert {os.path.basename(p)[:-5] for p in FILES} >= {stem for stem, *_ in CONFIGURATIONS}


@pytest.mark.parametrize("path", FILES, ids=lambda p: os.path.basename(p)[:-5])
def test_golden_sections_decode_to_the_golden_values(path):
    doc, dtype, x, sections, decoded = _load(path)
    codec = codecs.from_dict(doc["codec"])
    r = codec.decode(sections, dtype, doc["numel"])
    assert r.exact
    assert bytes(r.values.contiguous().view(torch.uint8).numpy()) == bytes(decoded.view(torch.uint8).numpy())
    if codec.lossless:
        assert torch.equal(decoded.view(torch.uint8), x.view(torch.uint8))


@pytest.mark.parametrize("path", FILES, ids=lambda p: os.path.basename(p)[:-5])
def test_golden_input_is_reproduced(path):
    doc, dtype, x, _sections, _decoded = _load(path)
    assert torch.equal(golden_input(dtype, doc["numel"]).view(torch.uint8), x.view(torch.uint8))


@pytest.mark.parametrize("path", [p for p in FILES if os.path.basename(p).startswith("raw-")],
                         ids=lambda p: os.path.basename(p)[:-5])
def test_raw_encoder_reproduces_its_golden_sections(path):
    doc, _dtype, x, sections, _decoded = _load(path)
    assert codecs.from_dict(doc["codec"]).encode(x) == sections
