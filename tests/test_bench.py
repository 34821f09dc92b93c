"""The benchmark's machinery on a tiny dataset (its figures come from `make bench`, not tests)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from benchmarks.bench import bench_training, report, training_config, write_dataset


@pytest.mark.slow
@pytest.mark.parametrize("model", ["lenet5", "alexnet"])
def test_the_training_and_the_plain_loop_alternate_step_by_step(tmp_path, model):
    cfg = training_config(model, batch_size=64, directory=tmp_path, epochs=2, device="cpu")
    write_dataset(cfg, train_images=256)
    interleave = bench_training(cfg, tmp_path / "run")
    assert interleave.images == 2 * 256  # the timed epochs, after the warm-up one
    assert all(seconds > 0 for seconds in interleave.seconds.values())
    momentum = [state["momentum_buffer"] for state in interleave.plain.optimizer.state.values()]
    parameters = list(interleave.plain.network.parameters())
    assert len(momentum) == len(parameters) and all(b.abs().sum() > 0 for b in momentum)
    # the pipeline side is a whole training: its checkpoints and its MLflow run
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("bench").experiment_id])
    assert len(client.get_metric_history(run.info.run_id, "train/loss_epoch")) == 3
    assert run.data.params["data.batch_size"] == "64"

    row = report(model, {64: interleave}, "cpu", epochs=2).splitlines()[-1].replace(",", "")
    batch, pipeline, plain, ratio = row.split()
    # images/s are printed as whole numbers: their ratio is exact only to about 1 / plain
    tolerance = 1 / float(plain) + 1e-3
    assert batch == "64" and float(ratio) == pytest.approx(
        float(pipeline) / float(plain), abs=tolerance
    )
