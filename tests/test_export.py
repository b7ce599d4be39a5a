"""elmer-export / elmer-import: pickle-free model files that generate bit-identically, and named errors
for every kind of damage."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from elmer_fairseq import ELMER
from elmer_fairseq.export import export_model, load_exported
from helpers import generate_args, ok, run


def script(name):
    """A console script installed next to the interpreter (setup.py entry_points)."""
    return os.path.join(os.path.dirname(sys.executable), name)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    tmp, dest, ckpt, _ = trained
    out = tmp_path_factory.mktemp("export") / "model"
    export_model(str(ckpt / "checkpoint_last.pt"), str(out))
    return out


def hypotheses(out):
    return [line for line in out.splitlines() if re.match(r"^[HPDE]-\d+\t", line)]


def test_export_import_generate_is_bit_identical(trained, exported, tmp_path):
    tmp, dest, ckpt, _ = trained
    assert sorted(os.listdir(exported)) == ["config.json", "dict.src.txt", "dict.tgt.txt", "model.safetensors"]
    back = tmp_path / "imported.pt"
    ok(subprocess.run([script("elmer-import"), str(exported), str(back)], capture_output=True, text=True))
    for extra in ([], ["--exit-threshold", "2", "--print-exit-layers"]):
        original = hypotheses(ok(run("fairseq_cli.generate", generate_args(dest, ckpt / "checkpoint_last.pt", *extra))))
        again = hypotheses(ok(run("fairseq_cli.generate", generate_args(dest, back, *extra))))
        assert original and original == again  # tokens, scores, positional scores, exit layers


def test_hub_loads_the_export_without_pickle(trained, exported, monkeypatch):
    tmp, dest, ckpt, _ = trained
    lines = [" ".join(line.split()[:12]) for line in (tmp / "test.src").read_text(encoding="utf-8").splitlines()]
    reference = ELMER.from_pretrained(str(ckpt), checkpoint_file="checkpoint_last.pt", data_name_or_path=str(dest))
    want = reference.generate(lines, exit_threshold=2, return_exit_layers=True)

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called: the export must load without pickle")

    monkeypatch.setattr(torch, "load", no_pickle)
    model = ELMER.from_pretrained(str(exported))
    assert model.generate(lines, exit_threshold=2, return_exit_layers=True) == want


def damaged_copy(exported, tmp_path, change):
    copy = tmp_path / "damaged"
    shutil.copytree(exported, copy)
    path = copy / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return copy


def test_tampered_exports_are_refused_by_name(exported, tmp_path):
    name = "decoder.layers.0.fc1.weight"

    def reshape(t):
        t[name] = t[name][:, :-1].contiguous()

    def drop(t):
        del t[name]

    def add(t):
        t["decoder.bogus.weight"] = torch.zeros(2, 2)

    cases = [
        (reshape, f"tensor {name} has shape"),
        (drop, f"missing tensor(s) ['{name}']"),
        (add, "unexpected tensor(s) ['decoder.bogus.weight']"),
    ]
    for i, (change, message) in enumerate(cases):
        copy = damaged_copy(exported, tmp_path / str(i), change)
        with pytest.raises(ValueError) as err:
            load_exported(str(copy))
        assert message in str(err.value) and "model.safetensors" in str(err.value), str(err.value)
    # a truncated file
    copy = tmp_path / "truncated"
    shutil.copytree(exported, copy)
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a complete safetensors file"):
        load_exported(str(copy))
    # a config.json from something else
    (copy / "config.json").write_text('{"format": "other"}', encoding="utf-8")
    with pytest.raises(ValueError, match="format 'other'"):
        load_exported(str(copy))


def test_console_scripts_report_errors_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([script("elmer-import"), str(tmp_path / "empty"), str(tmp_path / "x.pt")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("elmer-import: error: ")
    assert "no config.json" in proc.stderr
