"""Loading a saved `.keras` model a user names, with errors that say what to do."""

from __future__ import annotations

import os
import zipfile

import keras

__all__ = ["load_saved"]


def load_saved(path, *, hint="") -> keras.Model:
    """Loads a `.keras` model file in safe mode (tfadv's layers are registered).

    Args:
        path: the `.keras` file (str or PathLike).
        hint: appended to the error messages: how to get such a file.

    Returns:
        The Keras model.

    Raises:
        FileNotFoundError: there is no file at `path`, or it is a folder (the
            message names the .keras files in it).
        ValueError: the file is not a Keras model (not a `.keras` archive, or
            one Keras cannot rebuild); the message names the file and the cause.
    """
    path = os.fspath(path)
    tail = f" {hint}" if hint else ""
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith(".keras"))
        inside = (f" It holds {', '.join(repr(os.path.join(path, f)) for f in found[:4])}."
                  if found else " It holds no .keras file.")
        raise FileNotFoundError(f"{path!r} is a folder, not a .keras model file.{inside}{tail}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No model at {path!r}.{tail}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path!r} is not a Keras model file (a .keras archive, written by "
                         f"`model.save(...)`).{tail}")
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path!r} could not be loaded as a Keras model: {err}{tail}") from err
