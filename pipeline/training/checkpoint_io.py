"""Lightning's side of pipeline.checkpoints: the training's checkpoints written as it says."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io import TorchCheckpointIO

from pipeline.checkpoints import (
    checksum_file,
    record_checksums,
    recorded_checksums,
    sha256,
    staged,
    verify_checkpoint,
    weights_finite,
)

log = logging.getLogger(__name__)


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint files (`Trainer(plugins=[...])`) as this module describes."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        path = Path(path)
        if not weights_finite(checkpoint["state_dict"]):
            log.warning("%s not written: the model's weights are not finite", path)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with staged(path) as staging:
            super().save_checkpoint(checkpoint, staging, storage_options)
            digest = sha256(staging)
            record_checksums(path, [digest, *recorded_checksums(path)[:1]])
        record_checksums(path, [digest])

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        verify_checkpoint(Path(path))
        return super().load_checkpoint(path, *args, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        checksum_file(Path(path)).unlink(missing_ok=True)
