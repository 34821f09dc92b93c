"""The code of a logged classifier (an MLflow "model from code"): MLflow runs this file to load
the model, so no pickled object lies between its weights and its answers."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.models import set_model

from pipeline.config import DatasetConfig, ModelConfig
from pipeline.models import ImageClassifier, build_model


class ServedClassifier(mlflow.pyfunc.PythonModel):
    """The network rebuilt from the artifacts config.json (its ModelConfig and DatasetConfig,
    the training split's mean and std) and weights.pt (its state dict)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = json.loads(Path(context.artifacts["config"]).read_text())
        dataset = DatasetConfig(**config["dataset"])
        network = build_model(ModelConfig(**config["model"]), dataset)
        network.load_state_dict(torch.load(context.artifacts["weights"], weights_only=True))
        self.classes = list(dataset.classes)
        self.model = ImageClassifier(network, dataset, config["mean"], config["std"]).eval()

    def predict(self, context, model_input, params=None):
        """uint8 images N x C x H x W -> a row per image: class index, name, probabilities."""
        with torch.no_grad():
            probabilities = self.model(torch.as_tensor(model_input)).softmax(dim=1)
        indices = probabilities.argmax(dim=1).tolist()
        return pd.DataFrame(
            {
                "class_index": indices,
                "class_name": [self.classes[i] for i in indices],
                "probabilities": probabilities.double().numpy().tolist(),
            }
        )


set_model(ServedClassifier())
