"""Checkpoints load with weights_only=True: fairseq's types are allowed, code payloads are refused."""

import argparse
import os
import pickle

import numpy as np
import pytest
import torch
from fairseq import checkpoint_utils

import elmer_fairseq  # noqa: F401  (allow-lists the types)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_legacy_fairseq_checkpoint_loads(tmp_path):
    """A pre-0.10 / BART-style checkpoint: args Namespace, numpy scalars, OrderedDict."""
    path = tmp_path / "legacy.pt"
    state = {
        "args": argparse.Namespace(arch="bart_base", task="denoising"),
        "cfg": None,
        "model": {"w": torch.ones(2)},
        "extra_state": {"val_loss": np.float64(3.5), "best": np.float32(2.0), "n": np.int64(4)},
        "optimizer_history": [],
        "last_optimizer_state": None,
    }
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["args"].arch == "bart_base"
    assert loaded["extra_state"]["val_loss"] == 3.5


def test_code_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": Payload(str(marker))}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert not marker.exists()


def test_weights_only_is_not_switched_off():
    """Importing the plugin leaves torch.load's safe default in place."""
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") in (None, "", "0")
    with pytest.raises(pickle.UnpicklingError):
        import io

        buf = io.BytesIO()
        torch.save({"x": Payload("/nonexistent/never")}, buf)
        buf.seek(0)
        torch.load(buf)
