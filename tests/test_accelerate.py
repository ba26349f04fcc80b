"""accelerate integration (issue 16, item 6): a real Accelerator on CPU saves
its models as DTDR through save_state hooks and resumes bit-exactly."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

import torch_dtdr
from torch_dtdr.integrations.accelerate import use_dtdr


def _setup():
    set_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1))
    optim = torch.optim.AdamW(model.parameters(), lr=0.05)
    x = torch.randn(48, 6, generator=torch.Generator().manual_seed(1))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).cos()),
                                       batch_size=8, shuffle=False)
    accelerator = Accelerator(cpu=True)
    model, optim, data = accelerator.prepare(model, optim, data)
    use_dtdr(accelerator, parity="strong")
    return accelerator, model, optim, data


def _epoch(accelerator, model, optim, data):
    losses = []
    for x, y in data:
        loss = torch.nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        optim.step()
        optim.zero_grad()
        losses.append(loss.detach().clone())
    return losses


def test_save_state_writes_dtdr_and_load_state_resumes_bit_exactly(tmp_path):
    accelerator, model, optim, data = _setup()
    straight = _epoch(accelerator, model, optim, data) + _epoch(accelerator, model, optim, data)

    accelerator, model, optim, data = _setup()
    _epoch(accelerator, model, optim, data)
    accelerator.save_state(str(tmp_path / "ckpt"))
    files = sorted(os.listdir(tmp_path / "ckpt"))
    assert "model.dtdr" in files and not [f for f in files if f.startswith("model.safetensors")]
    assert torch_dtdr.verify(tmp_path / "ckpt" / "model.dtdr").status == "exact"

    accelerator, model, optim, data = _setup()  # a fresh start: different weights until the load
    accelerator.load_state(str(tmp_path / "ckpt"))
    resumed = _epoch(accelerator, model, optim, data)
    assert len(resumed) == 6
    for a, b in zip(straight[6:], resumed):
        assert torch.equal(a, b)
