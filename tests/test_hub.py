"""The Python API agrees with fairseq-interactive, and refuses non-UTF-8 bytes by name."""

import os
import re

import pytest

from helpers import REPO
from elmer_fairseq import ELMER
from helpers import ok, run


def test_api_matches_fairseq_interactive(trained):
    tmp, dest, ckpt, _ = trained
    lines = [" ".join(line.split()[:12]) for line in (tmp / "test.src").read_text(encoding="utf-8").splitlines()]
    out = ok(run("fairseq_cli.interactive", [
        str(dest), "--user-dir", os.path.join(REPO, "elmer_fairseq"), "--task", "nat_early_exit",
        "--path", str(ckpt / "checkpoint_last.pt"), "--cpu", "--source-lang", "src", "--target-lang", "tgt",
        "--exit-threshold", "2", "--print-exit-layers",
    ], input="\n".join(lines) + "\n"))
    cli_hyps = dict(re.findall(r"^H-(\d+)\t\S+\t?(.*)$", out, re.M))
    cli_exits = dict(re.findall(r"^E-(\d+)\t(.*)$", out, re.M))

    model = ELMER.from_pretrained(str(ckpt), checkpoint_file="checkpoint_last.pt", data_name_or_path=str(dest))
    got = model.generate(lines, exit_threshold=2, return_exit_layers=True)
    assert len(got) == len(lines) == len(cli_hyps)
    for i, (text, layers) in enumerate(got):
        assert text == cli_hyps[str(i)]
        assert " ".join(map(str, layers)) == cli_exits[str(i)]
    assert model.generate(lines[0], exit_threshold=2) == got[0][0]  # one sentence in, one string out


def test_api_takes_utf8_bytes_and_refuses_other_bytes(trained):
    tmp, dest, ckpt, _ = trained
    model = ELMER.from_pretrained(str(ckpt), checkpoint_file="checkpoint_last.pt", data_name_or_path=str(dest))
    assert model.generate(b"the cat") == model.generate("the cat")
    with pytest.raises(ValueError, match="sentence 1 is not valid UTF-8"):
        model.generate(["fine", b"bad \xff\xfe bytes"])
    with pytest.raises(TypeError, match="sentence 0 must be str"):
        model.generate([3])
