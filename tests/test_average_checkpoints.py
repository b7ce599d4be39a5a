"""elmer-average-checkpoints: mean weights by hand, everything else from the last input, bad input named."""

import os
import subprocess
import sys

import pytest
import torch

import elmer_fairseq  # noqa: F401  (allow-lists fairseq's checkpoint types)
from elmer_fairseq.average_checkpoints import average_states, last_checkpoints


def _save(path, w, step, half, extra="x"):
    torch.save({"model": {"w": torch.tensor(w), "steps": torch.tensor(step), "h": torch.tensor(half, dtype=torch.float16)},
                "cfg": {"common": {"seed": step}}, "extra_state": {"note": extra},
                "optimizer_history": [{"num_updates": step}]}, path)
    return str(path)


def test_average_by_hand(tmp_path):
    a = _save(tmp_path / "checkpoint_1_10.pt", [1.0, 2.0], 10, [0.5], "first")
    b = _save(tmp_path / "checkpoint_1_20.pt", [3.0, 6.0], 20, [1.5], "second")
    c = _save(tmp_path / "checkpoint_2_30.pt", [5.0, 1.0], 30, [2.5], "third")
    state = average_states([a, b, c])
    assert state["model"]["w"].tolist() == pytest.approx([3.0, 3.0])
    assert state["model"]["h"].dtype == torch.float16 and state["model"]["h"].item() == 1.5
    # integer buffers and everything outside the weights come from the last input
    assert state["model"]["steps"].item() == 30 and state["cfg"]["common"]["seed"] == 30
    assert state["extra_state"]["note"] == "third" and state["averaged_from"] == [os.path.abspath(p) for p in (a, b, c)]


def test_last_checkpoints_pick_by_number_not_by_name(tmp_path):
    paths = {u: _save(tmp_path / f"checkpoint_{e}_{u}.pt", [float(u)], u, [0.0]) for e, u in ((1, 90), (1, 100), (2, 1000))}
    epochs = {e: _save(tmp_path / f"checkpoint{e}.pt", [float(e)], e, [0.0]) for e in (2, 9, 10)}
    _save(tmp_path / "checkpoint_last.pt", [0.0], 1000, [0.0])  # the same update as checkpoint_2_1000.pt
    _save(tmp_path / "checkpoint_best.pt", [0.0], 0, [0.0])
    assert last_checkpoints(str(tmp_path), 2) == [paths[100], paths[1000]]
    assert last_checkpoints(str(tmp_path), 2, up_to=100) == [paths[90], paths[100]]
    assert last_checkpoints(str(tmp_path), 2, "epochs") == [epochs[9], epochs[10]]
    with pytest.raises(ValueError, match="2 checkpoint_<epoch>_<updates>.pt files at or before 100 updates, 3 needed"):
        last_checkpoints(str(tmp_path), 3, up_to=100)
    with pytest.raises(ValueError, match="3 checkpoint<epoch>.pt files, 4 needed .*--keep-last-epochs"):
        last_checkpoints(str(tmp_path), 4, "epochs")


def test_checkpoint_last_stands_for_an_update_that_ended_an_epoch(tmp_path):
    """fairseq writes no checkpoint_E_U.pt when update U ends an epoch: checkpoint_last.pt stands in for it."""
    four = _save(tmp_path / "checkpoint_1_4.pt", [1.0], 4, [0.0])
    last = _save(tmp_path / "checkpoint_last.pt", [3.0], 8, [0.0])
    assert last_checkpoints(str(tmp_path), 2, up_to=8) == [four, last]
    assert average_states([four, last])["model"]["w"].item() == 2.0
    with pytest.raises(ValueError, match="1 checkpoint_<epoch>_<updates>.pt files at or before 7 updates"):
        last_checkpoints(str(tmp_path), 2, up_to=7)


def test_mismatched_checkpoints_are_refused_by_name(tmp_path):
    a = _save(tmp_path / "a.pt", [1.0, 2.0], 1, [0.0])
    b = _save(tmp_path / "b.pt", [1.0, 2.0, 3.0], 2, [0.0])
    with pytest.raises(ValueError, match=r"b\.pt: its parameters differ from .*a\.pt's .*shapes differ: \['w'\]"):
        average_states([a, b])


def test_cli_writes_a_checkpoint_that_loads_weights_only(tmp_path):
    for u, w in ((10, 1.0), (20, 2.0), (30, 4.0)):
        _save(tmp_path / f"checkpoint_1_{u}.pt", [w], u, [0.0])
    out = tmp_path / "avg.pt"
    proc = subprocess.run([sys.executable, "-m", "elmer_fairseq.average_checkpoints", "--dir", str(tmp_path),
                           "--last-updates", "2", "--output", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert torch.load(out, weights_only=True)["model"]["w"].item() == 3.0
    bad = subprocess.run([sys.executable, "-m", "elmer_fairseq.average_checkpoints", "--inputs", str(tmp_path / "nope.pt"),
                          "--output", str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and "--inputs: " in bad.stderr and "nope.pt is not a file" in bad.stderr


def test_cli_at_most_averages_what_there_is_and_writes_nothing_for_none(tmp_path):
    """--at-most: fewer checkpoints than asked are all averaged (said); none: no output, exit 0 (said);
    without --dir it is refused by name."""
    cmd = [sys.executable, "-m", "elmer_fairseq.average_checkpoints", "--dir", str(tmp_path), "--last-epochs", "5",
           "--at-most", "--output", str(tmp_path / "avg.pt")]
    none = subprocess.run(cmd, capture_output=True, text=True)
    assert none.returncode == 0 and "nothing averaged" in none.stderr and not (tmp_path / "avg.pt").exists()
    for e, w in ((1, 1.0), (2, 2.0), (3, 6.0)):
        _save(tmp_path / f"checkpoint{e}.pt", [w], e, [0.0])
    fewer = subprocess.run(cmd, capture_output=True, text=True)
    assert fewer.returncode == 0 and "holds 3 checkpoint<epoch>.pt; averaging those" in fewer.stderr
    assert torch.load(tmp_path / "avg.pt", weights_only=True)["model"]["w"].item() == 3.0
    assert last_checkpoints(str(tmp_path), 2, "epochs", at_most=True) == [str(tmp_path / f"checkpoint{e}.pt") for e in (2, 3)]
    bad = subprocess.run(cmd[:3] + ["--inputs", str(tmp_path / "checkpoint1.pt"), "--at-most", "--output", "x.pt"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--at-most: expected --dir" in bad.stderr
