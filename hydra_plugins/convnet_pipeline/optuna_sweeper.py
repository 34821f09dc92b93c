"""Hydra instantiates plugins only from the `hydra_plugins` package: the project's Optuna
sweeper (pipeline/search/sweeper.py) under the name `hydra/sweeper=optuna` gives it."""

from pipeline.search.sweeper import StudySweeper


class OptunaSweeper(StudySweeper):
    """`hydra/sweeper=optuna`: an Optuna study behind Hydra's sweeper interface."""
