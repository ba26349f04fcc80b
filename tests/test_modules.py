"""save_model / load_model, and exact training resume from a DTDR checkpoint."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
import torch

import torch_dtdr

from .helpers import assert_same


class TiedLM(torch.nn.Module):
    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("position", torch.arange(8))


def _fresh(seed):
    torch.manual_seed(seed)
    return TiedLM()


def test_save_model_load_model_round_trip_with_tied_parameters(tmp_path):
    a = _fresh(0)
    f = tmp_path / "m.dtdr"
    torch_dtdr.save_model(a, f)
    info = torch_dtdr.api.info(f)
    stored = [t["name"] for t in info["tensors"]]
    assert len(stored) == 4  # embed/head stored once: embed.weight, norm.weight, norm.bias, position
    b = _fresh(1)
    assert not torch.equal(a.embed.weight, b.embed.weight)
    missing, unexpected = torch_dtdr.load_model(b, f)
    assert missing == [] and unexpected == []
    for k, v in a.state_dict().items():
        assert_same(b.state_dict()[k], v)
    assert b.head.weight is b.embed.weight  # the module's own tie is kept
    # the file alone also restores the tie
    sd = torch_dtdr.load(f)
    assert sd["head.weight"].data_ptr() == sd["embed.weight"].data_ptr()


def test_load_model_accepts_a_file_that_names_only_one_tied_copy(tmp_path):
    a = _fresh(0)
    sd = {k: v for k, v in a.state_dict().items() if k != "head.weight"}  # as HF checkpoints store tied weights
    torch_dtdr.save(sd, tmp_path / "m.dtdr")
    b = _fresh(1)
    missing, unexpected = torch_dtdr.load_model(b, tmp_path / "m.dtdr")
    assert (missing, unexpected) == ([], [])
    assert_same(b.head.weight.detach(), a.embed.weight.detach())


def test_missing_and_unexpected_keys_reported_like_load_state_dict(tmp_path):
    a = _fresh(0)
    sd = {k: v for k, v in a.state_dict().items() if k not in ("norm.bias",)}
    sd["extra.weight"] = torch.zeros(3)
    torch_dtdr.save(sd, tmp_path / "m.dtdr")
    with pytest.raises(RuntimeError) as e:
        torch_dtdr.load_model(_fresh(1), tmp_path / "m.dtdr")
    msg = str(e.value)
    assert 'Missing key(s) in state_dict: "norm.bias"' in msg
    assert 'Unexpected key(s) in state_dict: "extra.weight"' in msg
    assert msg.startswith("Error(s) in loading state_dict for TiedLM:")
    b = _fresh(1)
    missing, unexpected = torch_dtdr.load_model(b, tmp_path / "m.dtdr", strict=False)
    ref = _fresh(1).load_state_dict(dict(sd), strict=False)
    assert (missing, unexpected) == (ref.missing_keys, ref.unexpected_keys) == (["norm.bias"], ["extra.weight"])
    assert_same(b.norm.weight.detach(), a.norm.weight.detach())  # what was there was loaded


def test_load_model_device_codec_and_torch_files(tmp_path):
    a = _fresh(0)
    torch_dtdr.save_model(a, tmp_path / "m8.dtdr", codec="dtdr8")
    b = _fresh(1)
    torch_dtdr.load_model(b, tmp_path / "m8.dtdr", device="cpu")
    err = (b.embed.weight - a.embed.weight).norm() / a.embed.weight.norm()
    assert 0 < err < 0.02  # lossy codec: close, not equal
    assert_same(b.position, a.position)  # integers are stored raw
    torch.save(a.state_dict(), tmp_path / "m.pt")  # a torch state-dict file loads too
    c = _fresh(2)
    torch_dtdr.load_model(c, tmp_path / "m.pt")
    assert_same(c.embed.weight.detach(), a.embed.weight.detach())
    with pytest.raises(TypeError):
        torch_dtdr.save_model(a.state_dict(), tmp_path / "x.dtdr")


# ----------------------------------------------------------------------------- exact resume (the README recipe)


def _rng_state():
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def _build():
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=1000)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=2)
    return model, opt, sched, scaler


def _train(parts, start, stop):
    model, opt, sched, scaler = parts
    losses = []
    for _ in range(start, stop):
        x = torch.randn(16, 8) + torch.from_numpy(np.random.normal(0, 0.05, (16, 8)).astype(np.float32))
        if random.random() < 0.5:
            x = -x
        y = x[:, :2].sum(1, keepdim=True).tanh()
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        losses.append(struct.pack("<f", loss.item()))  # the float32 bits
    return losses


def _seed(s):
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def _checkpoint(parts, step):
    model, opt, sched, scaler = parts
    return {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "rng": _rng_state()}


def _resume(path, restore_rng=True):
    _seed(999)  # a restarted process starts from other random state
    parts = _build()
    model, opt, sched, scaler = parts
    ck = torch_dtdr.load(path, map_location="cpu", errors="strict")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    scaler.load_state_dict(ck["scaler"])
    if restore_rng:
        _set_rng_state(ck["rng"])
    return parts, ck["step"]


def test_training_resume_is_bit_identical(tmp_path):
    n = 16
    _seed(0)
    straight_parts = _build()
    straight = _train(straight_parts, 0, n)

    _seed(0)
    parts = _build()
    first = _train(parts, 0, n // 2)
    torch_dtdr.save(_checkpoint(parts, n // 2), tmp_path / "ckpt.dtdr")
    del parts  # nothing survives but the file
    parts, step = _resume(tmp_path / "ckpt.dtdr")
    assert step == n // 2
    resumed = first + _train(parts, step, n)
    assert resumed == straight  # bit-identical loss sequences

    # and the states at the end agree too
    for (k, v), (k2, v2) in zip(straight_parts[0].state_dict().items(), parts[0].state_dict().items()):
        assert k == k2
        assert_same(v, v2)
    assert straight_parts[3].state_dict() == parts[3].state_dict()
    assert straight_parts[3].get_scale() != 256.0  # the scaler's state changed along the way
    assert straight_parts[2].get_last_lr() == parts[2].get_last_lr()
    sa, sb = straight_parts[1].state_dict()["state"], parts[1].state_dict()["state"]
    for i in sa:
        for key in sa[i]:
            assert_same(sa[i][key], sb[i][key])

    # the test can fail: without the RNG states, the resumed run diverges
    parts, step = _resume(tmp_path / "ckpt.dtdr", restore_rng=False)
    assert first + _train(parts, step, n) != straight


def test_checkpoint_holds_every_rng_type_exactly(tmp_path):
    _seed(5)
    np.random.normal(size=3)  # numpy caches a gaussian: has_gauss / cached value in its state
    state = _rng_state()
    gen = np.random.default_rng(7)
    gen.random(3)
    state["numpy_generator"] = gen.bit_generator.state  # 128-bit ints
    torch_dtdr.save(state, tmp_path / "rng.dtdr")
    back = torch_dtdr.load(tmp_path / "rng.dtdr")
    assert_same(back["torch"], state["torch"])
    assert back["python"] == state["python"] and isinstance(back["python"], tuple)
    for a, b in zip(back["numpy"], state["numpy"]):
        assert (a == b).all() if isinstance(a, np.ndarray) else a == b
    assert back["numpy_generator"] == state["numpy_generator"]
    _set_rng_state(back)
    draws = (torch.rand(3), np.random.normal(size=2), random.random())
    _set_rng_state(state)
    assert torch.equal(draws[0], torch.rand(3)) and (draws[1] == np.random.normal(size=2)).all()
    assert draws[2] == random.random()


# ----------------------------------------------------------------------------- decoding in place (issue 16, item 8)


class Wide(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.big = torch.nn.Linear(1200, 1000)  # 1.2M elements: more than one segment
        self.small = torch.nn.Linear(8, 4)
        self.register_buffer("steps", torch.arange(5))


def test_load_model_decodes_into_the_parameters_own_memory(tmp_path):
    torch.manual_seed(0)
    a = Wide()
    torch_dtdr.save_model(a, tmp_path / "w.dtdr")
    torch.manual_seed(1)
    b = Wide()
    before = {k: v.data_ptr() for k, v in b.state_dict().items()}
    assert torch_dtdr.load_model(b, tmp_path / "w.dtdr") == ([], [])
    assert {k: v.data_ptr() for k, v in b.state_dict().items()} == before  # no new tensors
    for k, v in a.state_dict().items():
        assert_same(b.state_dict()[k], v)
    assert b.big.weight.requires_grad and type(b.big.weight) is torch.nn.Parameter


def test_load_model_assigns_on_a_meta_model_and_converts_dtypes(tmp_path):
    torch.manual_seed(0)
    a = Wide()
    torch_dtdr.save_model(a, tmp_path / "w.dtdr")
    with torch.device("meta"):
        b = Wide()
    torch_dtdr.load_model(b, tmp_path / "w.dtdr")
    for k, v in a.state_dict().items():
        assert b.state_dict()[k].device.type == "cpu"
        assert_same(b.state_dict()[k], v)
    c = Wide().double()  # another dtype: decoded, then copied with conversion, as load_state_dict does
    torch_dtdr.load_model(c, tmp_path / "w.dtdr")
    assert torch.equal(c.big.weight, a.big.weight.double())


def test_load_model_size_mismatch_is_reported_like_load_state_dict(tmp_path):
    torch.manual_seed(0)
    torch_dtdr.save_model(torch.nn.Linear(4, 3), tmp_path / "l.dtdr")
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: copying a param with shape "
                                           r"torch.Size\(\[3, 4\]\)"):
        torch_dtdr.load_model(torch.nn.Linear(5, 3), tmp_path / "l.dtdr", strict=False)


def test_read_into_fills_the_given_tensor_or_declines(tmp_path):
    x = torch.randn(1500, 1000)
    torch_dtdr.save({"x": x, "x_t": x.t(), "h": x[:10].half()}, tmp_path / "r.dtdr")
    with torch_dtdr.open(tmp_path / "r.dtdr") as stored:
        out = torch.empty(1500, 1000)
        assert stored.read_into("x", out) and torch.equal(out, x)
        assert not stored.read_into("x", torch.empty(1500, 1000, dtype=torch.float64))
        assert not stored.read_into("x_t", torch.empty(1000, 1500))  # a view of another entry
        assert not stored.read_into("x", torch.empty(1000, 1500).t())  # not contiguous
        assert stored.report().status == "exact"
