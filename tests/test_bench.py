"""The benchmark's machinery on a tiny dataset (its figures come from `make bench`, not tests)."""

from __future__ import annotations

import argparse

from mlflow.tracking import MlflowClient

from pipeline.bench import bench_training, report, training_config, write_dataset


def test_pipeline_and_plain_loop_alternate_step_by_step(tmp_path, capsys):
    cfg = training_config(batch_size=64)
    write_dataset(tmp_path, cfg.dataset, train=256)
    interleave = bench_training(cfg, tmp_path, epochs=2, device="cpu")
    assert interleave.images == 2 * 256  # the timed epochs, after the warm-up one
    assert all(seconds > 0 for seconds in interleave.seconds.values())
    momentum = [state["momentum_buffer"] for state in interleave.plain.optimizer.state.values()]
    assert len(momentum) == 10 and all(b.abs().sum() > 0 for b in momentum)  # it trained
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("bench").experiment_id])
    assert len(client.get_metric_history(run.info.run_id, "train/loss_epoch")) == 3

    report(interleave, argparse.Namespace(device="cpu", images=256, epochs=2), batch_size=64)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].split()[0] == "ratio" and float(lines[-1].split()[1]) > 0
