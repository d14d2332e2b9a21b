"""Errors a user can cause. The CLI prints their message (no traceback) and exits with code 2."""


class StropError(Exception):
    """Base of all user-facing errors: the message says what was wrong, where, and what to do."""


class ConfigError(StropError):
    """A config key or value is invalid."""


class DataError(StropError):
    """A data file is missing, unreadable or holds invalid rows."""


class ModelError(StropError):
    """A model folder is missing, incomplete or unsafe to load."""


class RunError(StropError):
    """A run folder is missing or incomplete."""


class ExportError(StropError):
    """A model cannot be exported or compressed, or the exported model disagrees with the original."""
