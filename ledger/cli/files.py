"""Files the user names for output (``export -o``, ``timeline --html``): written whole or not at all."""

from __future__ import annotations

import contextlib
import itertools
import os
import stat
import tempfile
from collections.abc import Iterator
from typing import TextIO

from ledger.cli.context import Failure


def refuse_database_files(path: str, database: str | None) -> None:
    """Raise a usage :class:`Failure` if ``path`` is the SQLite ``database`` or one of
    the files SQLite keeps beside it (its journal, WAL, shared memory; the ledger's
    migration lock): writing there would replace the ledger.

    Compared by resolved path (symlinks, ``..``, relative paths) and, for files
    that exist, by device and inode (hard links).
    """
    if database is None:
        return
    target = os.path.realpath(path)
    # SQLite names the files beside a symlinked database after the file it points to.
    for base, suffix in itertools.product({database, os.path.realpath(database)},
                                          ("", "-wal", "-shm", "-journal", ".migrate.lock")):
        protected = base + suffix
        same = target == os.path.realpath(protected)
        with contextlib.suppress(OSError):
            same = same or os.path.samefile(path, protected)
        if same:
            raise Failure(f"{path}: that is the ledger's own database file {os.path.realpath(protected)}; "
                          "writing it would replace the ledger: choose another file", exit_code=2)


@contextlib.contextmanager
def replaced_on_success(path: str, *, newline: str | None = None, database: str | None = None) -> Iterator[TextIO]:
    """A text file that becomes ``path`` only if the block succeeds; else ``path`` is untouched.

    The data goes to a temporary file beside ``path`` (same file system, so the
    rename is atomic), created 0600 because exports hold task arguments and
    results; an existing file keeps its mode. A device or pipe (``/dev/stdout``,
    a FIFO) cannot be replaced and is written directly. ``path`` may not be the
    SQLite file ``database`` or a file beside it (:func:`refuse_database_files`).
    """
    refuse_database_files(path, database)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise Failure(f"{path}: is a directory")
    if st is not None and not stat.S_ISREG(st.st_mode):
        try:
            with open(path, "w", newline=newline, encoding="utf-8") as out:
                yield out
        except OSError as exc:
            raise Failure(f"{path}: {exc.strerror or exc}") from None
        return
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise Failure(f"{path}: no such directory {parent}")
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline=newline, encoding="utf-8") as out:
            yield out
        if st is not None:
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
        os.replace(tmp, path)
    except BaseException as exc:
        os.unlink(tmp)
        if isinstance(exc, OSError):  # disk full, quota: name the file, not the temporary one
            raise Failure(f"{path}: {exc.strerror or exc}") from None
        raise
