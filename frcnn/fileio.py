"""Atomic file writes: write to a temporary file beside the target, then rename it over the target.

A reader (or a resumed run) sees either the old complete file or the new complete one, never half of one, even if
the writer is killed mid-write. Stdlib only, so every module may use it (``config`` included).

Also :func:`lock_directory`: one process at a time owns a work directory.
"""

import contextlib
import fcntl
import json
import os
import socket
import tempfile
import time


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """Yield a temporary path in ``path``'s folder; when the block succeeds it replaces ``path``, else it is removed.

    ``suffix`` keeps the ending some writers insist on (Keras wants ``.weights.h5``). The file gets the ordinary
    permissions of a new file (``mkstemp`` would leave it readable by its owner only).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(directory):
    """Delete the temporary files a killed writer left in ``directory``; returns how many were removed."""
    if not os.path.isdir(directory):
        return 0
    stale = [name for name in os.listdir(directory) if name.startswith(".tmp-")]
    for name in stale:
        os.remove(os.path.join(directory, name))
    return len(stale)


# ------------------------------------------------------------------------------------------ directory ownership

LOCK_NAME = ".lock"


class DirectoryLocked(RuntimeError):
    """Another live process owns the directory; the message names the directory and that owner."""


def _describe_owner(path):
    try:
        with open(path, encoding="utf-8") as f:
            owner = json.load(f)
        return f"process {owner['pid']} on host {owner['host']}, started {owner['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        # The owner has the lock but has not written its details yet (or wrote them in another format).
        return "another process (its details are not readable)"


@contextlib.contextmanager
def lock_directory(directory, what="run"):
    """Own ``directory`` for the duration of the block, or raise :class:`DirectoryLocked` naming the owner.

    ``fcntl.flock`` on ``<directory>/.lock``, not a pid file checked for liveness: the kernel drops the lock when
    its holder exits in any way (SIGKILL included), so a killed run never leaves the directory stuck, and there is
    no window between "is the owner alive?" and "take over". The file stays behind (deleting a lock file races
    with the next process opening it); it holds the owner's pid, host and start time for the refusal message.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DirectoryLocked(
                f"{os.path.abspath(directory)} is in use by another {what}: {_describe_owner(path)} (lock file "
                f"{path}). Wait for it to finish or stop it, or use another directory."
            ) from None
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock
