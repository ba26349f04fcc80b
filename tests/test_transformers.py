"""Hugging Face integration (issue 16, item 5) with real transformers and
sentence-transformers on all-MiniLM-L6-v2, offline."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertModel

import torch_dtdr
from torch_dtdr.errors import IntegrityError
from torch_dtdr.integrations import transformers as dtdr_hf

from .helpers import minilm_path, zero_range

SENTENCES = ["Checkpoints should survive bit rot.", "A monkey is playing drums.", "hello"]


@pytest.fixture(scope="module")
def minilm():
    folder = os.path.dirname(minilm_path())
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    batch = AutoTokenizer.from_pretrained(folder, local_files_only=True)(SENTENCES, padding=True,
                                                                         return_tensors="pt")
    with torch.no_grad():
        reference = model(**batch).last_hidden_state
    return folder, model, batch, reference


def _hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def test_sharded_save_pretrained_and_from_pretrained_are_bit_exact(minilm, tmp_path):
    folder, model, batch, reference = minilm
    files = dtdr_hf.save_pretrained(model, tmp_path, max_shard_size="30MB")
    assert len(files) == 3
    index = json.loads((tmp_path / "model.dtdr.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert sorted(set(index["weight_map"].values())) == [os.path.basename(f) for f in files]
    assert (tmp_path / "config.json").exists() and not list(tmp_path.glob("*.safetensors"))
    for cls in (AutoModel, BertModel):
        back = dtdr_hf.from_pretrained(cls, tmp_path)
        assert type(back) is BertModel and not back.training
        assert torch.equal(_hidden(back, batch), reference)


def test_a_folder_converted_by_torch_dtdr_convert_loads_the_same(minilm, tmp_path):
    folder, _model, batch, reference = minilm
    (tmp_path / "config.json").write_bytes(open(os.path.join(folder, "config.json"), "rb").read())
    torch_dtdr.convert(folder, tmp_path / "model.dtdr")
    assert torch.equal(_hidden(dtdr_hf.from_pretrained(AutoModel, tmp_path), batch), reference)
    (tmp_path / "out").mkdir()
    torch_dtdr.convert(tmp_path / "model.dtdr", tmp_path / "out" / "model.safetensors")
    (tmp_path / "out" / "config.json").write_bytes((tmp_path / "config.json").read_bytes())
    plain = AutoModel.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    assert torch.equal(_hidden(plain, batch), reference)


def test_damage_beyond_repair_is_refused_strictly_and_degrades_with_recover(minilm, tmp_path):
    _folder, model, batch, reference = minilm
    dtdr_hf.save_pretrained(model, tmp_path, parity="off")
    size = (tmp_path / "model.dtdr").stat().st_size
    zero_range(str(tmp_path / "model.dtdr"), size // 2, 4096)
    with pytest.raises(IntegrityError):
        dtdr_hf.from_pretrained(AutoModel, tmp_path)
    with pytest.warns(torch_dtdr.errors.DamageWarning):
        degraded = dtdr_hf.from_pretrained(AutoModel, tmp_path, errors="recover")
    assert torch.isfinite(_hidden(degraded, batch)).all()
    differ = [k for k, v in degraded.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert len(differ) == 1  # the damaged tensor, degraded gracefully; the rest bit-exact


def test_sentence_transformer_round_trip_is_bit_exact(minilm, tmp_path):
    from sentence_transformers import SentenceTransformer

    folder = minilm[0]
    original = SentenceTransformer(folder, device="cpu", local_files_only=True)
    reference = original.encode(SENTENCES, convert_to_tensor=True)
    dtdr_hf.save_sentence_transformer(original, tmp_path / "st")
    assert (tmp_path / "st" / "model.dtdr").exists() and not list((tmp_path / "st").glob("*.safetensors"))
    back = dtdr_hf.load_sentence_transformer(tmp_path / "st", device="cpu")
    assert torch.equal(back.encode(SENTENCES, convert_to_tensor=True), reference)
