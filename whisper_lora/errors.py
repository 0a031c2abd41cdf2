"""The one exception type users see.

Every problem with a user's input (a file, an option, a model) raises `UserError`; the CLI prints its
message on one line and exits non-zero, without a traceback. Anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem with the user's input, worded so that it can be fixed without reading our code."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class AudioError(UserError):
    """An audio file that is missing, undecodable, empty or not finite."""


class ManifestError(UserError):
    """A manifest that cannot be read or has a bad row."""
