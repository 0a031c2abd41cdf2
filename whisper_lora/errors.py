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
        self.message = message  # without the path: for reports that show the path in a column of its own
        super().__init__(f"{self.path}: {message}" if self.path else message)


class AudioError(UserError):
    """An audio file that is missing, undecodable, empty or not finite. `kind` says which, as the data
    doctor names its problems, so no caller has to read the message to tell them apart."""

    KINDS = ("missing_audio", "empty_audio", "undecodable_audio", "non_finite_audio", "bad_sample_rate", "bad_span",
             "too_long")

    def __init__(self, message: str, path: str | Path | None = None, kind: str = "undecodable_audio"):
        assert kind in self.KINDS, kind
        self.kind = kind
        super().__init__(message, path)

    def __reduce__(self):  # across processes (the doctor's workers) with its path and kind, not only its text
        return type(self), (self.message, self.path, self.kind)


class ManifestError(UserError):
    """A manifest that cannot be read or has a bad row."""
