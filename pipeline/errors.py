"""Errors a user can fix: the entry points print them as one clear message and exit non-zero."""


class PipelineError(Exception):
    """A failure whose message already says what happened and what to change."""


class ConfigError(PipelineError):
    """A config value is missing, misspelt or out of range."""
