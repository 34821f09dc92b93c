"""The model zoo: backbones (LeNet-5 x3, AlexNet) times heads (fc, gap, spp), built from config."""

from pipeline.models.build import InputShapeError, Network, build_model
from pipeline.models.config import ModelConfig

__all__ = ["InputShapeError", "ModelConfig", "Network", "build_model"]
