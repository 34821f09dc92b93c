"""Architecture report of any network of the zoo, without training it.

python -m pipeline.summary model=alexnet 'input=[3,224,224]' num_classes=1000
"""

from __future__ import annotations

from omegaconf import DictConfig

from pipeline.cli import hydra_entry
from pipeline.config import SummaryJob, validate
from pipeline.models import build_model
from pipeline.models.summary import describe


@hydra_entry("summary")
def main(cfg: DictConfig) -> None:
    config = validate(cfg, SummaryJob)
    print(describe(build_model(config.model, config.reported_dataset())))


if __name__ == "__main__":
    main()
