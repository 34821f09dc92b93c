"""The model zoo: backbones (LeNet-5 x3, AlexNet, NiN, or your own) times heads (fc, gap, spp),
built from config.

Importing the package registers every builder, so `BACKBONES` and `HEADS` are complete."""

from pipeline.models import zoo  # noqa: F401  (registers the zoo's backbones)
from pipeline.models.backbones import BACKBONES
from pipeline.models.build import (
    ImageClassifier,
    InputShapeError,
    Network,
    build_classifier,
    build_model,
)
from pipeline.models.heads import HEADS

__all__ = [
    "BACKBONES",
    "HEADS",
    "ImageClassifier",
    "InputShapeError",
    "Network",
    "build_classifier",
    "build_model",
]
