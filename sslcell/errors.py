"""Errors raised on bad input. Each message says what is wrong and where."""

from __future__ import annotations


class SSLCellError(Exception):
    """Base class of all sslcell errors."""


class InputError(SSLCellError, ValueError):
    """The data given to sslcell is malformed (shape, dtype, values, names)."""


class GeneMismatchError(InputError):
    """The input's genes do not overlap the model's gene list."""


class ChannelMismatchError(InputError):
    """The input's channels do not match the model's channel spec."""


class FileFormatError(InputError, OSError):
    """A file could not be read as the format it claims to be."""


class ConfigError(SSLCellError, ValueError):
    """A configuration field has a wrong name, type or value."""


class OverwriteError(SSLCellError, FileExistsError):
    """An output (file, directory or ``obsm`` key) exists and overwriting was not asked for."""


class SSLCellWarning(UserWarning):
    """A warning about the user's input or settings (``warnings.filterwarnings("ignore", category=SSLCellWarning)``
    silences sslcell's alone); the command line prints it as ``sslcell <command>: warning: ...``."""


class RunInterrupted(BaseException):
    """A training stopped by a signal (SIGTERM: ``kill``, a scheduler's time limit) before its end; a
    pretraining's checkpoint resumes it, a fine-tuning wrote nothing and is run again. Like ``KeyboardInterrupt``,
    not an ``Exception``: code that goes on after a failed step (a benchmark's next recipe) stops with it."""
