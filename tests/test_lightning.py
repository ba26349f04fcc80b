"""DTDRCheckpointIO with a real Lightning Trainer (issue 16, item 4): fit with
ModelCheckpoint, resume with ckpt_path, and the resumed losses equal an
uninterrupted run's bit for bit; synchronous and with AsyncCheckpointIO."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO

import torch_dtdr
from torch_dtdr.integrations.lightning import DTDRCheckpointIO


class Tiny(LightningModule):
    def __init__(self, width: int = 8, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(width, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.losses: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.detach().clone())
        return loss

    def configure_optimizers(self):
        optim = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": optim, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optim, 3, 0.5)}

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(64, self.hparams.width, generator=gen)
        data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
        return torch.utils.data.DataLoader(data, batch_size=16, shuffle=False)


def _trainer(epochs, plugin, tmp_path, callbacks=()):
    return Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, plugins=[plugin],
                   callbacks=list(callbacks), default_root_dir=tmp_path)


def _fit(epochs, plugin, tmp_path, ckpt_path=None, callbacks=()):
    torch.manual_seed(0)
    model = Tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about dataloader workers on a tiny CPU run
        _trainer(epochs, plugin, tmp_path, callbacks).fit(model, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_resume_from_a_dtdr_checkpoint_matches_an_uninterrupted_run(tmp_path, asynchronous):
    def plugin():
        io = DTDRCheckpointIO(parity="strong")
        return AsyncCheckpointIO(io) if asynchronous else io

    straight = _fit(4, plugin(), tmp_path / "straight")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    _fit(2, plugin(), tmp_path / "first", callbacks=[ckpt])
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"]
    path = tmp_path / "ckpt" / "epoch=1-step=8.ckpt"
    assert path.read_bytes()[:4] != b"PK\x03\x04" and torch_dtdr.verify(path).status == "exact"
    stored = torch_dtdr.load(path)
    assert stored["global_step"] == 8 and stored["hyper_parameters"]["lr"] == 0.05
    resumed = _fit(4, plugin(), tmp_path / "second", ckpt_path=str(path))
    assert len(straight.losses) == 16 and len(resumed.losses) == 8
    for a, b in zip(straight.losses[8:], resumed.losses):
        assert torch.equal(a, b)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_remove_checkpoint_and_missing_file(tmp_path):
    from lightning.fabric.utilities.data import AttributeDict

    io = DTDRCheckpointIO()
    io.save_checkpoint({"hparams": AttributeDict(lr=0.1)}, tmp_path / "h.ckpt")
    back = io.load_checkpoint(tmp_path / "h.ckpt")["hparams"]
    assert type(back) is AttributeDict and back.lr == 0.1
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "epoch": 1}, tmp_path / "sub" / "a.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "sub" / "a.ckpt")["state_dict"]["w"], torch.ones(2))
    io.remove_checkpoint(tmp_path / "sub" / "a.ckpt")
    io.remove_checkpoint(tmp_path / "sub" / "a.ckpt")  # already gone: no error, as Lightning's own
    with pytest.raises(FileNotFoundError, match="a.ckpt"):
        io.load_checkpoint(tmp_path / "sub" / "a.ckpt")
