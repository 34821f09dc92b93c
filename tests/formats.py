"""Writers of the exact upstream file formats, so tests can serve real-format datasets."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile

import numpy as np


def md5(content: bytes) -> str:
    return hashlib.md5(content).hexdigest()


def checksums_override(files: dict[str, bytes]) -> str:
    """The `dataset.checksums={...}` override that pins `files` by their md5s."""
    return "dataset.checksums={" + ",".join(f"{n}:{md5(c)}" for n, c in files.items()) + "}"


def idx_gz(array: np.ndarray) -> bytes:
    """MNIST's IDX format (big-endian header: 0, 0, type 0x08 = ubyte, ndim; then dims), gzipped."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


def mnist_files(train: tuple, test: tuple) -> dict[str, bytes]:
    """The four files of an MNIST-format mirror for (images N x 28 x 28, labels N) pairs."""
    return {
        "train-images-idx3-ubyte.gz": idx_gz(train[0]),
        "train-labels-idx1-ubyte.gz": idx_gz(train[1]),
        "t10k-images-idx3-ubyte.gz": idx_gz(test[0]),
        "t10k-labels-idx1-ubyte.gz": idx_gz(test[1]),
    }


def cifar_batches(train: tuple, test: tuple, classes: list[str]) -> dict[str, bytes]:
    """CIFAR-10's pickled batches: five training batches, a test batch and batches.meta."""

    def batch(images: np.ndarray, labels: np.ndarray) -> bytes:
        rows = images.reshape(len(images), -1)  # N x 3072, channel-major like the original
        return pickle.dumps({"data": rows, "labels": labels.tolist()})

    parts = np.array_split(np.arange(len(train[1])), 5)
    files = {f"data_batch_{i + 1}": batch(train[0][p], train[1][p]) for i, p in enumerate(parts)}
    files["test_batch"] = batch(*test)
    files["batches.meta"] = pickle.dumps({"label_names": classes})
    return files


def tar_gz(files: dict[str, bytes], folder: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, content in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()
