"""Interrupted training loses nothing; two runs with one seed are identical; atomic checkpoint copies."""

import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import REPO, write_payload_checkpoint
from elmer_fairseq.fairseq_compat import atomic_copy
from helpers import TRAIN_FLAGS, generate_args, ok, run

UPDATES = 40
RESUME_FLAGS = TRAIN_FLAGS + ["--max-update", str(UPDATES), "--save-interval-updates", "2", "--max-tokens", "256"]


def update_losses(text):
    """{num_updates: loss} from fairseq's train_inner lines (--log-interval 1)."""
    return {int(n): loss for loss, n in re.findall(r"train_inner \|.*? loss=([0-9.]+),.*? num_updates=(\d+),", text)}


@pytest.fixture(scope="module")
def uninterrupted(data_bin):
    tmp, dest = data_bin
    out = ok(run("fairseq_cli.train", [str(dest)] + RESUME_FLAGS + ["--save-dir", str(tmp / "full")]))
    losses = update_losses(out)
    assert sorted(losses) == list(range(1, UPDATES + 1)), out[-2000:]
    return losses


def test_same_seed_gives_identical_losses_and_generations(data_bin, uninterrupted):
    tmp, dest = data_bin
    out = ok(run("fairseq_cli.train", [str(dest)] + RESUME_FLAGS + ["--save-dir", str(tmp / "again")]))
    assert update_losses(out) == uninterrupted
    gens = [
        ok(run("fairseq_cli.generate", generate_args(dest, tmp / name / "checkpoint_last.pt")))
        for name in ("full", "again")
    ]
    hyps = [re.findall(r"^H-\d+\t.*$", g, re.M) for g in gens]
    assert hyps[0] and hyps[0] == hyps[1]


def test_sigkill_then_resume_continues_the_same_run(data_bin, uninterrupted):
    tmp, dest = data_bin
    save = tmp / "killed"
    cmd = [sys.executable, "-m", "fairseq_cli.train", str(dest)] + RESUME_FLAGS + ["--save-dir", str(save)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = save / "checkpoint_last.pt"
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random().uniform(0.0, 0.3))  # a random moment, possibly inside a save
    if proc.poll() is not None:
        pytest.fail(f"fairseq-train ended (rc {proc.returncode}) before the kill: raise UPDATES")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists(), "no checkpoint was saved before the kill"
    state = torch.load(last, weights_only=True)  # never truncated
    resumed_from = state["optimizer_history"][-1]["num_updates"]

    out = ok(run("fairseq_cli.train", [str(dest)] + RESUME_FLAGS + ["--save-dir", str(save)]))
    assert re.search(rf"Loaded checkpoint \S*checkpoint_last\.pt \(epoch \d+ @ {resumed_from} updates\)", out)
    resumed = update_losses(out)
    assert resumed_from < UPDATES
    assert sorted(resumed) == list(range(resumed_from + 1, UPDATES + 1))
    assert resumed == {n: uninterrupted[n] for n in resumed}  # same data order, RNG and LR schedule


def test_atomic_copy_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    src, dst = tmp_path / "new.pt", tmp_path / "checkpoint_last.pt"
    src.write_bytes(b"n" * 1000)
    dst.write_bytes(b"old complete checkpoint")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies mid-copy

    monkeypatch.setattr("shutil.copyfileobj", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == b"old complete checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_last.pt", "new.pt"]
    monkeypatch.undo()
    assert atomic_copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == b"n" * 1000
    assert not atomic_copy(str(src), str(dst), overwrite=False)


def test_fairseq_copies_go_through_the_atomic_copy():
    import elmer_fairseq  # noqa: F401
    from fairseq.file_io import PathManager

    assert PathManager.copy is atomic_copy


def test_restore_file_with_a_code_payload_is_refused(data_bin, tmp_path):
    _, dest = data_bin
    marker = tmp_path / "pwned"
    save = tmp_path / "ckpt"
    save.mkdir()
    write_payload_checkpoint(save / "checkpoint_last.pt", marker)
    proc = run("fairseq_cli.train", [str(dest)] + TRAIN_FLAGS + ["--max-update", "2", "--save-dir", str(save)])
    assert proc.returncode != 0
    assert "Weights only load failed" in proc.stderr
    assert not marker.exists()
