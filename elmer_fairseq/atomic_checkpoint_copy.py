"""Atomic checkpoint copies, so a killed run never leaves a truncated resume point.

fairseq 0.12 writes the first checkpoint of a save atomically (``.tmp`` then
rename) but then *copies* it to the other names (``checkpoint_last.pt``,
``checkpoint_best.pt``, ...) with a plain ``shutil.copyfile``: a SIGKILL during
that copy leaves a truncated ``checkpoint_last.pt``, and ``--restore-file``
then fails to load it. We route local copies through a temporary file in the
destination folder and ``os.replace`` it into place: the destination is
always either the old complete file or the new complete one.
"""

import os
import shutil
import tempfile

from fairseq.file_io import PathManager

_original_copy = PathManager.copy


def atomic_copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
    """``PathManager.copy`` for local paths, atomic on the destination."""
    if "://" in src_path or "://" in dst_path:
        return _original_copy(src_path, dst_path, overwrite=overwrite)
    if os.path.exists(dst_path) and not overwrite:
        return False
    folder = os.path.dirname(os.path.abspath(dst_path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(dst_path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out, open(src_path, "rb") as src:
            shutil.copyfileobj(src, out, length=16 * 1024 * 1024)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return True


def install():
    """Make fairseq's checkpoint copies atomic; idempotent."""
    PathManager.copy = staticmethod(atomic_copy)
