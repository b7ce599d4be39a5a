"""fairseq's own distributed training (torch.distributed, gloo on loopback) with ELMER.

Two processes, one per "GPU", each training on its shard of the batches, against one process
accumulating the same two batches per update (--update-freq 2). The objective is made
deterministic (soft exit with no gold mixing, no dropout) so the losses must agree closely.
"""

import os
import re
import socket
import subprocess
import sys

import torch

from helpers import REPO, TRAIN_FLAGS, ok

UPDATES = 4
FLAGS = TRAIN_FLAGS + [
    "--early-exit", "soft", "--soft-gold-prob", "0", "--dropout", "0", "--attention-dropout", "0",
    "--max-update", str(UPDATES), "--max-tokens", "256", "--no-save",
]
WORKER = os.path.join(REPO, "tests", "dist_worker.py")


def losses(text):
    return [float(x) for x in re.findall(r"train_inner \|.*? loss=([0-9.]+),", text)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_matches_one_process(data_bin, tmp_path):
    _, dest = data_bin
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    dist_flags = ["--distributed-world-size", "2", "--distributed-backend", "gloo",
                  "--distributed-init-method", "env://", "--distributed-no-spawn", "--ddp-backend", "legacy_ddp"]
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(tmp_path), str(dest)] + FLAGS + dist_flags + ["--distributed-rank", str(r)],
            cwd=REPO, env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "distributed init (rank 1)" in outs[1] or "initialized host" in outs[1], outs[1][-2000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k

    single_dir = tmp_path / "single"
    single_dir.mkdir()
    single = ok(subprocess.run(
        [sys.executable, WORKER, str(single_dir), str(dest)] + FLAGS + ["--update-freq", "2"],
        cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    ))
    dist_losses, single_losses = losses(outs[0]), losses(single)
    assert len(dist_losses) == len(single_losses) == UPDATES, (outs[0][-2000:], single[-2000:])
    for a, b in zip(dist_losses, single_losses):
        assert abs(a - b) <= 1e-3 * abs(b), (dist_losses, single_losses)
    alone = torch.load(single_dir / "rank0.pt")
    for k in rank0:
        assert torch.allclose(rank0[k], alone[k], atol=1e-5), k
