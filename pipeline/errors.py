"""Errors a user can fix: the entry points print them as one clear message and exit non-zero."""

from hydra.errors import CompactHydraException


class PipelineError(Exception):
    """A failure whose message already says what happened and what to change."""


class ConfigError(PipelineError):
    """A config value is missing, misspelt or out of range."""


class SearchError(PipelineError, CompactHydraException):
    """A search cannot start or go on. The sweeper runs outside the entry point's handling of
    errors: Hydra prints a CompactHydraException as its message alone, as that handling does."""
