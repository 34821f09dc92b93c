"""Errors a user can fix: the entry points print them as one clear message and exit non-zero.

A PipelineError is a CompactHydraException: where one escapes to Hydra itself (a sweeper, a
callback, a failed trial of a sweep) Hydra prints its message alone, as the entry points do.
HYDRA_FULL_ERROR=1 asks for the traceback, there and in the entry points.
"""

from hydra.errors import CompactHydraException


class PipelineError(CompactHydraException):
    """A failure whose message already says what happened and what to change."""


class ConfigError(PipelineError):
    """A config value is missing, misspelt or out of range."""


class SearchError(PipelineError):
    """A search cannot start or go on."""
