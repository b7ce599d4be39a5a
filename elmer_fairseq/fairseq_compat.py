"""Every change this package makes to fairseq 0.12 (fairseq-fixed 0.12.3.1) and torch beyond
registering its model, criterion and tasks, in one place. ``install()`` runs when ``elmer_fairseq``
is imported (``--user-dir elmer_fairseq``); it is idempotent.

Installed here, process-wide:

1. Checkpoints load with ``torch.load(weights_only=True)``: torch >= 2.6 loads that way by default
   and fairseq's checkpoints then fail on the few non-tensor types they pickle (fairseq issue 5610;
   fairseq's own fix, PR 5611, switches ``weights_only`` off, which lets a checkpoint run code). We
   allow-list exactly those types (``SAFE_GLOBALS``); a checkpoint that pickles anything else (a
   code payload such as ``os.system``) is still refused by torch.
2. Atomic checkpoint copies: fairseq writes the first file of a save atomically (``.tmp`` then
   rename) but copies it to the other names (``checkpoint_last.pt``, ``checkpoint_best.pt``) with a
   plain copy; a SIGKILL during that copy leaves a truncated ``checkpoint_last.pt`` that
   ``--restore-file`` cannot load (fairseq issue 2684). ``PathManager.copy`` goes through a
   temporary file in the destination folder and ``os.replace``: the destination is always the old
   complete file or the new complete one.

Overridden in our own classes (they change nothing outside them):

3. ``NATEarlyExitTask.get_batch_iterator``: fairseq drops the last batch when it is not a multiple
   of ``--required-batch-size-multiple`` (fairseq issue 5036), so fairseq-generate skipped up to 7
   sentences; we batch with a multiple of 1 and say so. And a run resumed at epoch E > 1 batches as
   the run it continues (fairseq orders the examples once, with the seed of the first epoch built).
4. ``ElmerDenoisingDataset.collater``: fairseq's denoising collate reports the first source's token
   count as ``nsentences`` and builds teacher-forcing ``prev_output_tokens`` that a NAR decoder
   does not take; we count sentences and drop them.
"""

import argparse
import collections
import os
import shutil
import tempfile

import torch
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


# What fairseq checkpoints pickle besides tensors, dicts, lists and Python scalars:
# the legacy ``args`` Namespace (BART's model.pt, pre-0.10 checkpoints),
# OrderedDicts (state dicts, meters) and numpy scalars (older meters and losses).
SAFE_GLOBALS = [argparse.Namespace, collections.OrderedDict]


def _numpy_globals():
    """numpy scalars (e.g. a best loss saved as np.float64) and their dtypes; no arrays."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch
        return []
    try:
        from numpy._core.multiarray import scalar as np_scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar as np_scalar

    dtypes = [type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "bool")]
    return [np_scalar, np.dtype] + dtypes


def register_safe_globals():
    """Allow-list the types fairseq checkpoints hold; idempotent."""
    torch.serialization.add_safe_globals(SAFE_GLOBALS + _numpy_globals())


def install():
    """Install 1 and 2 above."""
    register_safe_globals()
    PathManager.copy = staticmethod(atomic_copy)
