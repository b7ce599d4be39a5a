"""Load fairseq checkpoints with ``torch.load(weights_only=True)``.

torch >= 2.6 loads with ``weights_only=True`` by default, and fairseq 0.12
checkpoints then fail on the few non-tensor types they pickle. Rather than
switching ``weights_only`` off (which lets a checkpoint run code), we
allow-list exactly those types. A checkpoint that pickles anything else (a
code payload such as ``os.system``) is still refused by torch.
"""

import argparse
import collections

import torch

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
