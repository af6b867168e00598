"""Output paths given on the command line, checked before the work whose results they receive:
a folder where a file is wanted (or the reverse), or a place nothing can be written, is a usage
error at once rather than a failure at the end of the work."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.core.errors import UsageError


def check_output_file(path: Path, flag: str) -> None:
    """Refuse a file path the command could not write when done: an existing folder, an
    existing file it may not write, a folder above it that is a file, or a place where
    nothing can be created (read-only, no permission). Missing folders are fine: they are
    created when the file is written."""
    try:
        if path.is_dir():
            raise UsageError(f"{flag} {path}: is a folder; give the path of a file")
        if path.is_file():
            with path.open("ab"):  # opened for writing, nothing written
                pass
            return
        if path.exists():  # a device such as /dev/null, or a pipe: written as it is
            return
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write it ({exc.strerror})") from None
    _check_creatable(path.parent, path, flag)


def check_output_folder(path: Path, flag: str) -> None:
    """Refuse a folder path the command could not write into when done: an existing file, a
    folder above it that is a file, or a place where nothing can be created."""
    try:
        if path.exists() and not path.is_dir():
            raise UsageError(f"{flag} {path}: is a file, not a folder")
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write in it ({exc.strerror})") from None
    _check_creatable(path, path, flag)


def _check_creatable(folder: Path, path: Path, flag: str) -> None:
    """Whether files can be created in folder, or, where it is missing, in the nearest folder
    above it that exists (where the missing ones will be created): by creating a nameless
    temporary file there."""
    existing = folder
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise UsageError(f"{flag} {path}: {existing} is a file, not a folder")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot create files in {existing} "
                         f"({exc.strerror})") from None
