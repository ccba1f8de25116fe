"""Atomic file writes: write to a temporary file beside the target, then rename it over the target.

A reader (or a resumed run) sees either the old complete file or the new complete one, never half of one, even if
the writer is killed mid-write. Stdlib only, so every module may use it (``config`` included).
"""

import contextlib
import os
import tempfile


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
