"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half.

Every result file tfadv writes (metrics, histories, thresholds, reports,
centres-study results, record metadata, saved models) goes through
`atomic_path`: the content is written to a temporary name in the same
directory and moved over the target with `os.replace`, which is atomic on
POSIX and Windows; a run killed mid-write leaves the previous file intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path, *, suffix=None):
    """Yields a temporary path next to `path`; on success moves it over `path`.

    Args:
        path: the file to write (str or Path); its directory must exist.
        suffix: suffix of the temporary name (default: `path`'s, so that
            writers that pick a format by extension, e.g. Keras `.keras`,
            still do).

    Yields:
        The temporary path (a `str`), not yet created.

    Raises:
        Whatever the body raises; the temporary file is then removed and
        `path` is left untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp",
                               dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # writers that refuse to overwrite (or create directories) get a free name
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            os.unlink(tmp)
        raise


def output_dir(path) -> Path:
    """Creates the output folder `path` (and its parents) if missing; returns it.

    Raises:
        ValueError: `path` is an existing file (a folder is expected).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file, not a folder: give --out a folder (it is created "
                         "if missing).")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_text(path, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_json(path, obj, *, indent=1) -> None:
    """Writes `obj` as JSON to `path` atomically.

    Raises:
        TypeError / ValueError: `obj` is not JSON-serialisable (`path` untouched).
    """
    write_text(path, json.dumps(obj, indent=indent))


def read_json_or_empty(path) -> dict:
    """The JSON object in `path`, or {} when there is none or it cannot be read.

    For caches a killed run may have left torn or missing: their work is
    then redone.
    """
    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
