"""One exception for every way a checkpoint directory can be wrong."""

from __future__ import annotations

import os


class CheckpointError(ValueError):
    """A file of a model directory is unusable. The message starts with that file's path, then names the
    field or tensor and what was expected, on one line, so a CLI can print it as it is."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = str(path)
        self.reason = " ".join(str(message).split())  # one line, whatever the underlying library wrote
        super().__init__(f"{self.path}: {self.reason}")
