"""convnet-pipeline: DVC, Lightning, Hydra and MLflow for classic convolutional networks."""
