"""What a task's trainings produced, kept in ``--workdir`` so that a killed or stopped run resumes
(``sslcell benchmark --resume``) instead of training every candidate again.

Each finished training leaves one JSON file, ``<workdir>/<task>/fits/<key>.json``, named by a SHA-256 of everything
that decides its outcome (the caller's ``parts``: data, rows, entry, setting, seed, device; the sslcell and torch
versions are always added). With ``resume`` a file whose key matches is read back instead of training again; files
are always written, so a run without ``--resume`` can be resumed later. Files are JSON only (nothing executes on
reading) and written atomically, so a run killed while writing leaves no half file. A resumed value records the
git commit that made it; the task says in its results how many it resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from sslcell.benchmark.record import git_commit
from sslcell.checkpoint import atomic_write
from sslcell.errors import FileFormatError
from sslcell.provenance import versions


class FitStore:
    """JSON values keyed by what produced them, in ``directory`` (created on the first write)."""

    def __init__(self, directory: str | Path, *, resume: bool) -> None:
        self.directory = Path(directory)
        self.resume = resume
        self.resumed: list[str] = []  # descriptions of the values read back, in order
        self.commits: set[str] = set()  # the commits that made them
        self._versions = versions(("sslcell", "torch"))
        self._commit = git_commit()["commit"]
        self._parts: dict[str, str] = {}  # key -> the JSON text it hashes, written beside the value

    def key(self, **parts: Any) -> str:
        """A SHA-256 of ``parts`` (JSON-able, with ``default=str`` for the rest) and the package versions."""
        text = json.dumps({**parts, "versions": self._versions}, sort_keys=True, default=str)
        key = hashlib.sha256(text.encode()).hexdigest()
        self._parts[key] = text
        return key

    def get(self, key: str, what: str) -> dict[str, Any] | None:
        """The value stored under ``key`` if resuming and there is one (``what`` describes it in ``resumed``)."""
        path = self.directory / f"{key}.json"
        if not self.resume or not path.is_file():
            return None
        try:
            stored = json.loads(path.read_text())
            value, commit = stored["value"], stored["commit"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise FileFormatError(f"{path}: not a stored benchmark result ({err}); delete it to train that "
                                  "setting again") from None
        self.resumed.append(what)
        self.commits.add(str(commit))
        logging.getLogger("sslcell.benchmark").info("resumed: %s", what)
        return value

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Store ``value`` (JSON-able, strict: no NaN) under ``key``, replacing any earlier value atomically; beside it
        what the key hashes (``parts``: to see why a later run's key differs)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        parts = json.loads(self._parts[key]) if key in self._parts else None
        text = json.dumps({"commit": self._commit, "parts": parts, "value": value}, allow_nan=False)
        atomic_write(self.directory / f"{key}.json", lambda tmp: tmp.write_text(text))

    def note(self) -> str | None:
        """A sentence for the results when values were resumed, else None."""
        if not self.resumed:
            return None
        commits = ", ".join(sorted(c[:12] for c in self.commits))
        return (f"Resumed from --workdir ({self.directory}): {len(self.resumed)} training(s) an earlier run of the "
                f"same settings finished (commit {commits}) were read back, not trained again: "
                + "; ".join(self.resumed) + ".")
