"""Fixtures shared by the tests (plain helpers are in helpers.py)."""

import os
import re

import pytest

from helpers import REPO, TRAIN_FLAGS, make_task, ok, run


@pytest.fixture
def task():
    return make_task()


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    raw = os.path.join(REPO, "data-bin", "sample-raw")
    tmp = tmp_path_factory.mktemp("cli")
    # a word-level slice of the bundled corpus keeps this fast
    for split, n in (("train", 48), ("valid", 8), ("test", 6)):
        for side in ("src", "tgt"):
            with open(os.path.join(raw, f"{split}.{side}"), encoding="utf-8") as f:
                lines = [" ".join(next(f).split()[:24]) for _ in range(n)]
            (tmp / f"{split}.{side}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    dest = tmp / "data-bin"
    ok(run("fairseq_cli.preprocess", [
        "--source-lang", "src", "--target-lang", "tgt",
        "--trainpref", str(tmp / "train"), "--validpref", str(tmp / "valid"), "--testpref", str(tmp / "test"),
        "--destdir", str(dest), "--joined-dictionary", "--workers", "1",
    ]))
    return tmp, dest


@pytest.fixture(scope="module")
def trained(data_bin):
    tmp, dest = data_bin
    ckpt = tmp / "ckpt"
    out = ok(run("fairseq_cli.train", [str(dest)] + TRAIN_FLAGS + ["--max-update", "4", "--save-dir", str(ckpt)]))
    assert (ckpt / "checkpoint_last.pt").exists()
    losses = [float(x) for x in re.findall(r"\| loss ([0-9.]+) \|", out)]
    assert losses, out[-2000:]
    return tmp, dest, ckpt, out
