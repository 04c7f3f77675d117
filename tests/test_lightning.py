"""The PyTorch Lightning adapter (skipped when Lightning is not installed)."""

import pytest
import torch

import fxexpand
from fxexpand.demo import DigitsNet
from fxexpand.training import lightning_callback

pl = pytest.importorskip("lightning.pytorch")


class Module(pl.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def training_step(self, batch, idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_callback_runs_the_decay():
    expanded = fxexpand.compile(DigitsNet(), passes=fxexpand.recipes.netbooster())
    ds = torch.utils.data.TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    data = torch.utils.data.DataLoader(ds, batch_size=8)
    trainer = pl.Trainer(max_epochs=2, callbacks=[lightning_callback(epochs=2, steps_per_epoch=4, decay_fraction=0.5)],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(Module(expanded), train_dataloaders=data)
    assert fxexpand.get_decay(expanded) == 1.0
    fxexpand.contract(expanded.eval(), (ds.tensors[0][:2],))
