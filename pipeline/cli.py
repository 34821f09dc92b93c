"""One way to start an entry point: Hydra composes `conf/`, expected failures end cleanly."""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.config import T, validate
from pipeline.errors import ConfigError, PipelineError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

log = logging.getLogger("pipeline")

# ${coalesce:a,b,...}: the first value that is not null (e.g. train.resume, else a new run dir)
OmegaConf.register_new_resolver(
    "coalesce", lambda *values: next((v for v in values if v is not None), None), replace=True
)
# ${if_set:x,a,b}: a when x is not null, else b (a resumed training's own .hydra folder)
OmegaConf.register_new_resolver(
    "if_set", lambda value, then, otherwise: otherwise if value is None else then, replace=True
)


def compose_config(config_name: str, schema: type[T], overrides: Sequence[str] = ()) -> T:
    """`conf/<config_name>.yaml` with command-line overrides, validated, outside a Hydra main
    (tests, `make bench`); composing fails as a ConfigError, as validating does."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            composed = compose(config_name, overrides=list(overrides))
        except ConfigCompositionException as err:
            raise ConfigError(str(err)) from err
    return validate(composed, schema)


def hydra_entry(config_name: str) -> Callable[[Callable[[DictConfig], object]], Callable[[], None]]:
    """Wrap `task(cfg)` as a Hydra main over `conf/<config_name>.yaml`.

    A PipelineError (bad config, unreachable mirror, corrupt download...) or an OSError (a
    full disk, a folder it may not write) is printed as one message, without a traceback
    (HYDRA_FULL_ERROR=1 shows it), and the process exits with status 1. In a sweep (`-m`) it
    is raised on instead, so that the sweeper records the trial as failed rather than the
    whole sweep ending.
    """

    def wrap(task: Callable[[DictConfig], object]) -> Callable[[], None]:
        @functools.wraps(task)
        def main(cfg: DictConfig) -> object:
            try:
                return task(cfg)
            except (PipelineError, OSError) as err:
                log.error("%s", err if isinstance(err, PipelineError) else os_error_advice(err))
                if (
                    HydraConfig.get().mode == RunMode.MULTIRUN
                    or os.environ.get("HYDRA_FULL_ERROR") == "1"
                ):
                    raise
                sys.exit(1)

        return hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(
            main
        )

    return wrap


OS_ADVICE = {
    errno.ENOSPC: "free some space on that disk and run the same command again",
    errno.EDQUOT: "free some of your disk quota and run the same command again",
    errno.EACCES: "check that you may write there, or point the config at a folder you own",
    errno.EPERM: "check that you may write there, or point the config at a folder you own",
    errno.EFBIG: "a file-size limit (ulimit -f) or the file system caps that file's size",
    errno.EROFS: "that file system is read-only: point the config at a writable folder",
}


def os_error_advice(err: OSError) -> str:
    """An OSError as one line: what failed, on which file, and what to do about it."""
    advice = OS_ADVICE.get(err.errno or 0, "check that path, then run the same command again")
    return f"{err}; {advice}"
