"""The benchmark's machinery on a tiny dataset (its figures come from `make bench`, not tests)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from benchmarks.bench import (
    bench_minimal,
    bench_training,
    report,
    training_config,
    write_dataset,
)
from benchmarks.gpu_check import Report, on_par

IMAGES = 128  # two batches an epoch


@pytest.mark.slow
@pytest.mark.parametrize("model", ["lenet5", "alexnet"])
def test_the_training_and_the_plain_loop_alternate_step_by_step(tmp_path, model):
    cfg = training_config(model, batch_size=64, directory=tmp_path, epochs=2, device="cpu")
    write_dataset(cfg, train_images=IMAGES)
    interleave = bench_training(cfg, tmp_path / "run")
    assert interleave.images == 2 * IMAGES  # the timed epochs, after the warm-up one
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

    # the warm-up epoch, kept apart for the compile time, less its profiled (untimed) step
    assert interleave.warmup[1] == IMAGES - 64

    minimal = bench_minimal(cfg, tmp_path / "minimal")
    assert minimal.images == 2 * IMAGES and all(s > 0 for s in minimal.seconds.values())

    # each column's ratio is its training over the plain steps interleaved with it
    table = report(
        model,
        {64: {"minimal": minimal, "eager": interleave, "compiled": interleave}},
        "cpu",
        epochs=2,
        images=IMAGES,
    )
    row = table.splitlines()[-2].split()
    batch, plain, minimal_rate, minimal_pace, eager, pace, own_cost, compiled, compiled_pace = row[
        :9
    ]
    both = (minimal.images + 2 * interleave.images) / (
        minimal.seconds["plain"] + 2 * interleave.seconds["plain"]
    )
    assert batch == "64" and plain == f"{both:,.0f}"
    assert eager == compiled == f"{interleave.rate('training'):,.0f}"
    assert float(pace) == float(compiled_pace) == pytest.approx(interleave.pace(), abs=0.01)
    assert minimal_rate == f"{minimal.rate('training'):,.0f}"
    assert float(minimal_pace) == pytest.approx(minimal.pace(), abs=0.01)
    assert float(own_cost) == pytest.approx(interleave.pace() / minimal.pace(), abs=0.01)
    # one step of each profiled: the pipeline's step dispatches what the minimal one does and
    # more (its augmentation and the epoch's sums)
    assert 0 < minimal.operators < interleave.operators
    counts = f"minimal {minimal.operators}, eager {interleave.operators}"
    assert table.splitlines()[-1].endswith(f"batch 64: {counts}, compiled {interleave.operators}")


def test_the_gpu_check_compares_recipes_by_their_seeds_spread_not_by_one_seed():
    spread = [0.975, 0.985, 0.99]  # three seeds, as the digits recipe's range over seeds
    assert on_par(spread, spread)[0]
    # a mean 0.4 points lower with no spread: within the 0.5-point floor
    assert on_par([0.98] * 3, [0.984] * 3)[0]
    # a recipe 2 points worse on every seed is not on par, whatever the spread
    same, said = on_par([a - 0.02 for a in spread], spread)
    assert not same and "-2.00 points" in said
    # one seed's test image (1/360) never decides it: a wide spread widens the tolerance
    assert on_par([0.96, 0.99, 0.975], [0.97, 0.995, 0.98])[0]


def test_a_gpu_check_that_raises_is_reported_and_the_next_still_runs(tmp_path):
    """One GPU session may be all there is: a check that breaks (a graph that will not
    capture) must not cost the others, and what was measured is on disk as it comes."""
    out = tmp_path / "gpu-check.txt"
    report = Report(out)
    report.add("first figure")
    with report.check("graphed recipe"):
        raise RuntimeError("operation not permitted when stream is capturing")
    assert "first figure" in out.read_text()  # written before the end
    with report.check("benchmark"):
        report.add("second figure")
    assert report.problems == [
        "graphed recipe: RuntimeError: operation not permitted when stream is capturing"
    ]
    text = out.read_text()
    assert (
        text.index("first figure")
        < text.index("graphed recipe raised")
        < text.index("second figure")
    )
    assert 'raise RuntimeError("operation not permitted' in text  # the traceback's end
