"""Atomic file writes: write to a temporary file beside the target, then rename it over the target.

A reader (or a resumed run) sees either the old complete file or the new complete one, never half of one, even if
the writer is killed mid-write. The rename also replaces a symbolic link at the target instead of writing through
it, so a planted link cannot redirect a write out of the folder the user named. Stdlib only, so every module may use
it (``config`` included).

Also :func:`lock_directory` (one process at a time owns a work directory), :func:`make_directory` (a folder the user
named, or one line saying why it cannot be used), :func:`check_inside` (a folder that must not be a link out of its
parent), :func:`is_within` (a dataset path that must stay under its root) and temporary folders that a killed
process may leave behind (:func:`temporary_directory`, :func:`remove_orphaned_directories`).
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
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


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`): a link at ``path`` is replaced, not followed."""
    suffix = os.path.splitext(os.fspath(path))[1]
    with atomic_path(os.fspath(path), suffix) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return path


def remove_stale_temporaries(directory):
    """Delete the temporary files a killed writer left in ``directory``; returns how many were removed."""
    if not os.path.isdir(directory):
        return 0
    stale = [name for name in os.listdir(directory) if name.startswith(".tmp-")]
    for name in stale:
        os.remove(os.path.join(directory, name))
    return len(stale)


# ------------------------------------------------------------------------------------------- folders and paths


class UnusableDirectory(OSError):
    """A folder the user named cannot be created or written; the message is one line naming the path and why."""


_REASONS = {
    errno.EROFS: "it is on a read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.ENAMETOOLONG: "the name is too long",
    errno.ELOOP: "too many levels of symbolic links",
}


def _reason(err):
    return _REASONS.get(err.errno) or (err.strerror or str(err)).lower()


def make_directory(directory):
    """Create ``directory`` (and its parents) if needed; :class:`UnusableDirectory` with one line naming the path and
    the reason otherwise: a file in the way (the path itself, or a file where a folder of the path should be), a
    read-only file system, no permission."""
    directory = os.fspath(directory)
    if os.path.isdir(directory):
        return directory
    if os.path.lexists(directory):
        what = "a symbolic link to nothing" if os.path.islink(directory) else "a file"
        raise UnusableDirectory(f"{directory} cannot be used as a folder: it is {what}")
    # A file somewhere on the path: name it (the kernel's ENOTDIR does not say which component it is).
    parent = os.path.dirname(os.path.abspath(directory))
    while parent and not os.path.exists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise UnusableDirectory(f"{directory} cannot be created: {parent} on its path is a file, not a folder")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise UnusableDirectory(f"{directory} cannot be created: {_reason(err)}") from None
    return directory


def is_within(path, root):
    """True when ``path`` (made absolute, ``..`` resolved, links NOT followed) lies under ``root``.

    For paths taken from data files (a COCO ``file_name``, a VOC image id): ``../x.jpg`` or ``/etc/passwd`` leave
    the dataset; a symbolic link the user put inside the dataset is the user's choice and is followed."""
    root = os.path.normpath(os.path.abspath(root))
    path = os.path.normpath(os.path.join(root, path))
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_inside(directory, parent, what):
    """Refuse (:class:`UnusableDirectory`) a folder ``directory`` under ``parent`` that is a symbolic link resolving
    outside ``parent``: files written there would land elsewhere than where the user said."""
    if not os.path.islink(directory):
        return
    target = os.path.realpath(directory)
    if not is_within(target, os.path.realpath(parent)):
        raise UnusableDirectory(
            f"{what} {directory} is a symbolic link to {target}, outside {parent}: nothing is written through it. "
            "Replace the link by a folder, or name the other location itself"
        )


# ---------------------------------------------------------------------------- temporary folders of killed runs

_TEMP_LOCK = ".owner"


@contextlib.contextmanager
def temporary_directory(parent, prefix):
    """A new folder ``parent/<prefix>XXXX`` owned by this process (a kernel lock on a file inside it) until the
    block ends; yields its path. The folder keeps ``0o777 & ~umask`` (not ``mkdtemp``'s private ``0700``), so it can
    be renamed into place as a shared folder. The caller moves it away or it is removed at the end of the block; a
    process killed meanwhile leaves it, and :func:`remove_orphaned_directories` removes it on the next run."""
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    lock = os.path.join(path, _TEMP_LOCK)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.chmod(path, 0o777 & ~_umask())
        yield path
    finally:
        os.close(fd)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)


def release_temporary(path):
    """Remove the owner file of a :func:`temporary_directory` from ``path`` (after it was renamed into place)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(path, _TEMP_LOCK))


def remove_orphaned_directories(parent, prefix, min_age_s=60.0):
    """Remove the ``parent/<prefix>*`` folders of :func:`temporary_directory` whose owner is gone (killed): nobody
    holds their lock. A folder without an owner file (killed in the instant between creating the two) counts as
    orphaned once it is ``min_age_s`` old. Returns the removed paths."""
    removed = []
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        if os.path.islink(path) or not os.path.isdir(path):
            continue
        try:
            fd = os.open(os.path.join(path, _TEMP_LOCK), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            try:
                orphaned = time.time() - os.path.getmtime(path) > min_age_s
            except OSError:
                continue
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                orphaned = True
            except BlockingIOError:
                orphaned = False  # its owner is alive
            finally:
                os.close(fd)
        if orphaned:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


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

    A folder that cannot be used (a file in the way, read-only, no permission) is :class:`UnusableDirectory`, one
    line naming the path and the reason. The lock file is opened without following a symbolic link: a link planted
    at ``.lock`` is refused, never truncated through.
    """
    make_directory(directory)
    path = os.path.join(directory, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP or os.path.islink(path):
            raise UnusableDirectory(f"{directory} cannot be locked: its {LOCK_NAME} is a symbolic link (remove it)") \
                from None
        raise UnusableDirectory(f"{directory} cannot be used: {_reason(err)}") from None
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
