"""The code of a logged classifier: the loader module MLflow imports to load it (its custom
flavor contract: `_load_pyfunc(data_path)`), so no pickled object lies between its weights and
its answers, and the model's MLmodel names only this module and its own folder `data/classifier`."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from pipeline.models import InputShapeError, build_classifier


class RefusedInput(MlflowException, ValueError):
    """Input the signature let through but the network cannot read. An MlflowException, so
    that `mlflow models serve` answers 400 with this message alone (any other exception: a
    generic message and the stack trace, server paths included); a ValueError for Python
    callers, like the network's own InputShapeError."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


CONFIG, WEIGHTS = "config.json", "weights.pt"  # in the model's data folder


def _load_pyfunc(data_path: str) -> ServedClassifier:
    return ServedClassifier(Path(data_path))


class ServedClassifier:
    """The network rebuilt from `directory`'s config.json (its ModelConfig and DatasetConfig,
    the training split's mean and std) and weights.pt (its state dict)."""

    def __init__(self, directory: Path) -> None:
        config = json.loads((directory / CONFIG).read_text())
        self.model = build_classifier(**config).eval()
        weights = torch.load(directory / WEIGHTS, weights_only=True)
        self.model.network.load_state_dict(weights)
        self.classes = list(self.model.dataset_cfg.classes)

    def predict(self, model_input, params=None):
        """uint8 images N x C x H x W -> a row per image: class index, name, probabilities."""
        images = torch.as_tensor(model_input)
        self.refuse_unreadable(images)
        with torch.no_grad():
            probabilities = self.model(images).softmax(dim=1)
        indices = probabilities.argmax(dim=1).tolist()
        return pd.DataFrame(
            {
                "class_index": indices,
                "class_name": [self.classes[i] for i in indices],
                "probabilities": probabilities.double().numpy().tolist(),
            }
        )

    def refuse_unreadable(self, images: torch.Tensor) -> None:
        """Refuse images too small (GAP, SPP) or of another size (fc), and images that can only
        have been floats in [0, 1]: the signature's uint8 comes first (MLflow casts the JSON of a
        request to it, truncating fractions; out-of-range values it refuses itself), so floats
        reach the model as pixels of 0 and 1, which no digit image is."""
        try:
            self.model.network.check_input(tuple(images.shape))
        except InputShapeError as error:
            raise RefusedInput(str(error)) from None
        if images.numel() and images.max() <= 1:
            raise RefusedInput(
                "input pixels are all 0 or 1, as floats in [0, 1] become when cast to the "
                "signature's uint8; this model takes uint8 pixels 0-255 (multiply by 255 and round)"
            )
