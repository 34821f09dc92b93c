"""`trainer.cuda_graph=true` without a GPU: what runs around the graphs. A graph replays the
step it captured (pipeline.training.graphs, measured by `make gpu-check` on a GPU); here that
step runs eagerly in its place, and the module's own stepping around it (Lightning's manual
optimization: the fused optimizer, a per-step schedule, the epoch's sums) must train as
automatic optimization does. The refusals at start: tests/test_config.py."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from pipeline.training.fit import open_data
from pipeline.training.module import Classifier
from tests.conftest import train_config

pytestmark = pytest.mark.slow


class EpochEnds(L.Callback):
    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        self.seen.append({k: float(metrics[k]) for k in ("train/loss_epoch", "train/acc")})


def fit(data_dir, graphed: bool) -> tuple[Classifier, L.Trainer, EpochEnds]:
    """The digits recipe (one-cycle SGD: a schedule stepped every batch), 3 epochs."""
    cfg = train_config("experiment=digits", f"paths.data_dir={data_dir}", "trainer.max_epochs=3")
    data = open_data(cfg)
    L.seed_everything(cfg.seed, workers=True)
    hparams = dict(Classifier.from_config(cfg, data.meta).hparams)
    L.seed_everything(cfg.seed, workers=True)
    module = Classifier(**{**hparams, "cuda_graph": graphed})
    if graphed:
        module.graphed = module.graph_step  # a graph's stand-in: the step it captures, run as is
    epochs = EpochEnds()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[epochs],
    )
    trainer.fit(module, data)
    return module, trainer, epochs


def test_the_module_steps_around_its_graphs_as_automatic_optimization_does(data_dir):
    automatic, automatic_trainer, automatic_epochs = fit(data_dir, graphed=False)
    manual, manual_trainer, manual_epochs = fit(data_dir, graphed=True)

    assert not manual.automatic_optimization and manual.scheduler_interval == "step"
    # every step counted, the schedule stepped as often, the optimizer fused
    assert manual_trainer.global_step == automatic_trainer.global_step == 3 * 18
    optimizer = manual_trainer.optimizers[0]
    assert optimizer.defaults["fused"] and not automatic_trainer.optimizers[0].defaults["fused"]
    lrs = [t.optimizers[0].param_groups[0]["lr"] for t in (manual_trainer, automatic_trainer)]
    assert lrs[0] == pytest.approx(lrs[1], rel=1e-12)
    # the same training, up to the fused kernel's rounding
    for name, weight in automatic.state_dict().items():
        torch.testing.assert_close(manual.state_dict()[name], weight, rtol=1e-3, atol=1e-4)
    for seen, expected in zip(manual_epochs.seen, automatic_epochs.seen, strict=True):
        assert seen == pytest.approx(expected, abs=1e-3)
