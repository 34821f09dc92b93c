"""The fetch and preprocess stages, end to end over a real loopback HTTP mirror."""

from __future__ import annotations

import gzip
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.cli import compose_config
from pipeline.config import PrepareJob
from pipeline.data.fetch import fetch
from pipeline.data.preprocess import preprocess
from pipeline.data.store import SPLITS, atomic_directory, load_split, read_meta
from pipeline.errors import ConfigError, PipelineError
from tests.conftest import Mirror, run_module
from tests.formats import checksums_override, cifar_batches, mnist_files, tar_gz

CIFAR_CLASSES = [
    *("airplane", "automobile", "bird", "cat", "deer"),
    *("dog", "frog", "horse", "ship", "truck"),
]


def data_config(*overrides: str) -> PrepareJob:
    return compose_config("data", PrepareJob, overrides)


def random_images(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def assert_splits_match(out: Path, train: tuple, test: tuple, val_size: int) -> None:
    """Every processed image and label is the generated one its `index` points at."""
    splits = {name: load_split(out, name) for name in SPLITS}
    for name, split in splits.items():
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        source = test if name == "test" else train
        rows = split.index.numpy()
        np.testing.assert_array_equal(split.images.numpy(), source[0][rows])
        np.testing.assert_array_equal(split.labels.numpy(), source[1][rows])
    pool = np.concatenate([splits["train"].index.numpy(), splits["val"].index.numpy()])
    assert sorted(pool.tolist()) == list(range(len(train[1])))  # a partition of the pool
    assert len(splits["val"].labels) == val_size
    np.testing.assert_array_equal(splits["test"].index.numpy(), np.arange(len(test[1])))
    meta = read_meta(out)
    assert meta["splits"]["test"]["count"] == len(test[1])
    assert sum(meta["splits"]["train"]["per_class"]) == len(train[1]) - val_size


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_idx_dataset_downloads_and_preprocesses_exactly(dataset, mirror: Mirror, tmp_path):
    rng = np.random.default_rng(0)
    train = (random_images(rng, 50, (28, 28)), rng.integers(0, 10, 50, dtype=np.uint8))
    test = (random_images(rng, 20, (28, 28)), rng.integers(0, 10, 20, dtype=np.uint8))
    files = mnist_files(train, test)
    for name, content in files.items():
        mirror.put(name, content)
    cfg = data_config(
        f"dataset={dataset}",
        f"dataset.mirrors=[{mirror.url}]",
        checksums_override(files),
        "dataset.val_size=10",
        f"paths.data_dir={tmp_path / 'data'}",
    )
    fetch(cfg)
    out = preprocess(cfg)
    images_nchw = (train[0][:, None], train[1]), (test[0][:, None], test[1])
    assert_splits_match(out, *images_nchw, val_size=10)


def test_cifar10_downloads_and_preprocesses_exactly(mirror: Mirror, tmp_path):
    rng = np.random.default_rng(1)
    train = (random_images(rng, 30, (3, 32, 32)), rng.integers(0, 10, 30))
    test = (random_images(rng, 8, (3, 32, 32)), rng.integers(0, 10, 8))
    batches = cifar_batches(train, test, CIFAR_CLASSES)
    archive = tar_gz(batches, "cifar-10-batches-py")
    mirror.put("cifar-10-python.tar.gz", archive)
    cfg = data_config(
        "dataset=cifar10",
        f"dataset.mirrors=[{mirror.url}]",
        checksums_override({"cifar-10-python.tar.gz": archive, **batches}),
        "dataset.val_size=6",
        f"paths.data_dir={tmp_path / 'data'}",
    )
    fetch(cfg)
    assert_splits_match(preprocess(cfg), train, test, val_size=6)


def test_corrupt_download_is_rejected_and_leaves_nothing(mirror: Mirror, tmp_path):
    rng = np.random.default_rng(2)
    files = mnist_files(
        (random_images(rng, 10, (28, 28)), rng.integers(0, 10, 10, dtype=np.uint8)),
        (random_images(rng, 5, (28, 28)), rng.integers(0, 10, 5, dtype=np.uint8)),
    )
    for name, content in files.items():
        mirror.put(name, content)
    corrupt = "t10k-labels-idx1-ubyte.gz"
    mirror.put(corrupt, bytes(b ^ 0xFF for b in files[corrupt]))  # same size, other bytes
    data_dir = tmp_path / "data"
    overrides = (f"paths.data_dir={data_dir}", "dataset=mnist", "dataset.val_size=2")
    fetched = run_module(
        "pipeline.data.fetch",
        *overrides,
        f"dataset.mirrors=[{mirror.url}]",
        checksums_override(files),
    )
    assert fetched.returncode == 1
    assert "checksum mismatch" in fetched.stdout and corrupt in fetched.stdout
    assert "Traceback" not in fetched.stdout + fetched.stderr
    processed = run_module("pipeline.data.preprocess", *overrides)
    assert processed.returncode == 1 and "pipeline.data.fetch dataset=mnist" in processed.stdout
    leftovers = [p.relative_to(data_dir) for p in data_dir.rglob("*") if p.is_file()]
    assert leftovers == []


def test_unreachable_mirror_fails_and_says_what_to_change(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on once closed
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/mnist/"
    result = run_module(
        "pipeline.data.fetch",
        "dataset=mnist",
        f"dataset.mirrors=[{dead}]",
        f"paths.data_dir={tmp_path}",
        timeout_s=120,  # refused at once: only a hang takes this long
    )
    assert result.returncode == 1
    for expected in ("'mnist'", dead, "dataset.mirrors", "Connection refused"):
        assert expected in result.stdout
    assert not (tmp_path / "raw" / "mnist").exists()


def cifar10_mirror(mirror: Mirror, batches: dict[str, bytes], data_dir: Path) -> PrepareJob:
    """cifar10 fetched from `mirror`, which serves `batches` in its archive; the config pins
    the archive and the batches as generated (`batches` may be changed after packing)."""
    rng = np.random.default_rng(3)
    packed = cifar_batches(
        (random_images(rng, 10, (3, 32, 32)), rng.integers(0, 10, 10)),
        (random_images(rng, 4, (3, 32, 32)), rng.integers(0, 10, 4)),
        CIFAR_CLASSES,
    )
    archive = tar_gz({**packed, **batches}, "cifar-10-batches-py")
    mirror.put("cifar-10-python.tar.gz", archive)
    return data_config(
        "dataset=cifar10",
        f"dataset.mirrors=[{mirror.url}]",
        checksums_override({"cifar-10-python.tar.gz": archive, **packed}),
        "dataset.val_size=2",
        f"paths.data_dir={data_dir}",
    )


def test_archive_holding_other_files_is_rejected_and_leaves_nothing(mirror: Mirror, tmp_path):
    cfg = cifar10_mirror(mirror, {"data_batch_3": b"another batch"}, tmp_path / "data")
    with pytest.raises(PipelineError, match=r"archive rejected.*data_batch_3 has md5"):
        fetch(cfg)
    assert not (tmp_path / "data" / "raw" / "cifar10").exists()


def test_a_file_the_reader_needs_must_be_pinned_by_an_md5(mirror: Mirror, tmp_path):
    cfg = cifar10_mirror(mirror, {}, tmp_path / "data")
    del cfg.dataset.checksums["test_batch"]
    fetch(cfg)
    with pytest.raises(ConfigError, match=r"'test_batch', which dataset\.checksums does not list"):
        preprocess(cfg)


def test_a_pinned_file_that_is_not_idx_is_named(mirror: Mirror, tmp_path):
    rng = np.random.default_rng(4)
    files = mnist_files(
        (random_images(rng, 4, (28, 28)), rng.integers(0, 10, 4, dtype=np.uint8)),
        (random_images(rng, 2, (28, 28)), rng.integers(0, 10, 2, dtype=np.uint8)),
    )
    files["t10k-labels-idx1-ubyte.gz"] = gzip.compress(b"labels as text, not IDX")
    for name, content in files.items():
        mirror.put(name, content)
    cfg = data_config(
        "dataset=mnist",
        f"dataset.mirrors=[{mirror.url}]",
        checksums_override(files),
        "dataset.val_size=1",
        f"paths.data_dir={tmp_path / 'data'}",
    )
    fetch(cfg)
    with pytest.raises(PipelineError, match=r"t10k-labels-idx1-ubyte\.gz is not an IDX file"):
        preprocess(cfg)


def test_unknown_dataset_lists_the_valid_names():
    result = run_module("pipeline.data.fetch", "dataset=imagenet")
    assert result.returncode != 0
    for name in ("cifar10", "digits", "fashion_mnist", "mnist"):
        assert name in result.stderr


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("dataset.val_size=-1", "dataset.val_size"),
        ("dataset.channels=2", "dataset.channels"),
        ("dataset.source=ImageNet", "CIFAR10"),
        ("+dataset.mirorrs=[http://x/]", "mirorrs"),
        ("dataset.mirrors=[ftp://host/]", "dataset.mirrors"),
    ],
)
def test_bad_config_fails_naming_the_key(override: str, named: str):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        data_config("dataset=mnist", override)


def test_digits_are_real_mnist_framed_and_split_by_seed(tmp_path):
    from sklearn.datasets import load_digits

    cfg = data_config("dataset=digits", f"paths.data_dir={tmp_path}")
    fetch(cfg)
    out = preprocess(cfg)
    meta = read_meta(out)
    assert [meta["splits"][s]["count"] for s in SPLITS] == [1137, 300, 360]
    assert meta["shape"] == [1, 28, 28]
    original = load_digits()
    rows = torch.cat([load_split(out, s).index for s in SPLITS])
    assert sorted(rows.tolist()) == list(range(1797))  # train/val/test partition the bundle
    test = load_split(out, "test")
    np.testing.assert_array_equal(test.labels.numpy(), original.target[test.index.numpy()])
    # MNIST framing: a 4-pixel empty border, the digit in the central 20x20, full 0-255 range
    assert test.images[:, :, :4].max() == 0 and test.images[:, :, :, 24:].max() == 0
    assert test.images.max() == 255
    shrunk = F.interpolate(test.images[:, :, 4:24, 4:24].float(), size=8, mode="area")
    grey = torch.from_numpy(original.images).float().flatten(1) * 255 / 16
    nearest = torch.cdist(shrunk.flatten(1), grey).argmin(dim=1)
    # framed images are the bundle's scans: shrunk back, nearly all are nearest to their own
    # among all 1,797 (bilinear blur makes a few look closer to a similar scan)
    assert (nearest == test.index).float().mean() > 0.95

    again = preprocess(cfg)
    assert read_meta(again)["sha256"] == meta["sha256"]  # same seed, same bytes
    reseeded = data_config("dataset=digits", f"paths.data_dir={tmp_path}", "dataset.split_seed=1")
    assert read_meta(preprocess(reseeded))["sha256"] != meta["sha256"]


def test_atomic_directory_keeps_the_old_output_when_interrupted(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as staging:
        (staging / "complete.txt").write_text("v1")
    with pytest.raises(KeyboardInterrupt), atomic_directory(target) as staging:
        (staging / "complete.txt").write_text("half of v2")
        raise KeyboardInterrupt
    assert (target / "complete.txt").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging left behind
