"""End to end through fairseq's own CLIs with --user-dir: preprocess, train, resume, generate, interactive."""

import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import REPO, TRAIN_FLAGS, generate_args, ok, run, write_payload_checkpoint


def test_train_logs_lplm_metrics(trained):
    out = trained[3]
    assert "exit_layer" in out and "long_targets" in out
    assert "added <mask>" in out


def test_resume_loads_checkpoint_last(trained):
    tmp, dest, ckpt, _ = trained
    out = ok(run("fairseq_cli.train", [str(dest)] + TRAIN_FLAGS + ["--max-update", "6", "--save-dir", str(ckpt)]))
    assert re.search(r"Loaded checkpoint \S*checkpoint_last\.pt \(epoch \d+ @ 4 updates\)", out), out[-2000:]
    assert "num_updates 6" in out or "num_updates=6" in out


def test_generate_prints_hypotheses_and_bleu(trained):
    tmp, dest, ckpt, _ = trained
    out = ok(run("fairseq_cli.generate", generate_args(dest, ckpt / "checkpoint_last.pt")))
    assert len(re.findall(r"^H-\d+\t", out, re.M)) == 6
    assert len(re.findall(r"^P-\d+\t", out, re.M)) == 6
    assert "BLEU4" in out


def test_generate_with_hard_exit_threshold(trained):
    tmp, dest, ckpt, _ = trained
    out = ok(run("fairseq_cli.generate", generate_args(dest, ckpt / "checkpoint_last.pt", "--exit-threshold", "0.5")))
    assert len(re.findall(r"^H-\d+\t", out, re.M)) == 6


def test_generate_with_bf16_generation(trained):
    """--bf16-generation through fairseq-generate: every hypothesis printed, the cast logged."""
    tmp, dest, ckpt, _ = trained
    out = ok(run("fairseq_cli.generate", generate_args(dest, ckpt / "checkpoint_last.pt", "--bf16-generation")))
    assert len(re.findall(r"^H-\d+\t", out, re.M)) == 6
    assert "cast to bfloat16" in out


def test_interactive(trained):
    tmp, dest, ckpt, _ = trained
    proc = run("fairseq_cli.interactive", [
        str(dest), "--user-dir", os.path.join(REPO, "elmer_fairseq"), "--task", "nat_early_exit",
        "--path", str(ckpt / "checkpoint_last.pt"), "--cpu", "--source-lang", "src", "--target-lang", "tgt",
    ], input="Return the number of bytes written .\nRemove a section from the parser .\n")
    out = ok(proc)
    assert len(re.findall(r"^H-\d+\t", out, re.M)) == 2


def test_interactive_non_utf8_input_is_replaced_and_logged(trained):
    """A strict UTF-8 stdin (PYTHONIOENCODING=utf-8) with a Latin-1 byte: every line still gets a
    hypothesis, and the bad line is reported instead of a UnicodeDecodeError traceback."""
    tmp, dest, ckpt, _ = trained
    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_cli.interactive", str(dest), "--user-dir", os.path.join(REPO, "elmer_fairseq"),
         "--task", "nat_early_exit", "--path", str(ckpt / "checkpoint_last.pt"), "--cpu",
         "--source-lang", "src", "--target-lang", "tgt"],
        input=b"Return the caf\xe9 number .\nRemove a section .\n", capture_output=True, cwd=REPO,
        env=dict(os.environ, PYTHONIOENCODING="utf-8"),
    )
    out = proc.stdout.decode("utf-8", "replace") + proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, out[-3000:]
    assert len(re.findall(r"^H-\d+\t", out, re.M)) == 2
    assert "input line 1 is not valid UTF-8: 1 undecodable byte(s) replaced by U+FFFD" in out


def test_generate_refuses_a_code_payload_checkpoint(trained, tmp_path):
    _, dest, _, _ = trained
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    write_payload_checkpoint(evil, marker)
    proc = run("fairseq_cli.generate", generate_args(dest, evil))
    assert proc.returncode != 0
    assert "Weights only load failed" in proc.stderr
    assert not marker.exists()


def test_print_exit_layers_and_plot(trained, tmp_path):
    tmp, dest, ckpt, _ = trained
    logs = []
    for delta in ("0", "100"):
        out = ok(run("fairseq_cli.generate", generate_args(dest, ckpt / "checkpoint_last.pt",
                                                           "--exit-threshold", delta, "--print-exit-layers")))
        e_lines = re.findall(r"^E-(\d+)\t(.*)$", out, re.M)
        h_lines = dict(re.findall(r"^H-(\d+)\t\S+\t(.*)$", out, re.M))
        assert len(e_lines) == 6
        for idx, layers in e_lines:  # one exit layer per hypothesis token (+ </s> when emitted)
            assert len(layers.split()) - len(h_lines[idx].split()) in (0, 1)
        expected = "3" if delta == "0" else "1"  # δ = 0: the last of 3 layers; huge δ: layer 1
        assert {x for _, layers in e_lines for x in layers.split()} == {expected}
        every = " ".join(f"L{k}={1.0 if str(k) == expected else 0.0:.3f}" for k in (1, 2, 3))
        assert f"Exit layers: {every} | mean {expected}.000" in out  # every layer shows, empty ones too
        log = tmp_path / f"gen{delta}.txt"
        log.write_text(out, encoding="utf-8")
        logs += ["--log", f"{delta}={log}"]
    png = tmp_path / "exits.png"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "plot_exit_layers.py"), *logs,
                           "--out", str(png)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "L1=1.000 L2=0.000 L3=0.000" in proc.stdout  # the plot has a bar slot for every layer


@pytest.mark.parametrize("strategy", ["hard", "soft"])
def test_train_and_generate_with_early_exit_strategy(data_bin, strategy):
    tmp, dest = data_bin
    ckpt = tmp / f"ckpt-{strategy}"
    out = ok(run("fairseq_cli.train", [str(dest)] + TRAIN_FLAGS + [
        "--early-exit", strategy, "--hard-all-layer-loss", "--max-update", "3", "--save-dir", str(ckpt)]))
    assert "num_updates 3" in out
    out = ok(run("fairseq_cli.generate", generate_args(dest, ckpt / "checkpoint_last.pt", "--print-exit-layers",
                                                       "--collapse-repeats")))
    assert len(re.findall(r"^H-\d+\t", out, re.M)) == 6
    if strategy == "soft":  # soft exit reads every token at the last layer
        assert "Exit layers: L1=0.000 L2=0.000 L3=1.000 | mean 3.000" in out


def test_sweep_threshold_script_tables_and_plots(trained, tmp_path):
    """scripts/sweep_threshold.sh: one row per δ (its mean exit layer read back from the E- lines by
    elmer-exit-layers) and the Figure-2 plot."""
    tmp, dest, ckpt, _ = trained
    out_dir = tmp_path / "sweep"
    env = {**os.environ, "VENV": os.path.dirname(os.path.dirname(sys.executable))}
    proc = subprocess.run(["bash", "scripts/sweep_threshold.sh", str(dest), str(ckpt / "checkpoint_last.pt"), "test",
                           str(out_dir), "0", "100"], cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines()[1:] if not line.startswith("plot:")]
    assert [(r[0], r[2]) for r in rows] == [("0", "3.000"), ("100", "1.000")]  # δ, mean exit layer
    assert (out_dir / "exit_layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prepare_sample_script_encodes_every_split(tmp_path):
    """scripts/prepare_sample.sh through scripts/bpe.sh: sentencepiece trained on train, every split
    encoded line for line, binarized."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for split, n in (("train", 120), ("valid", 10), ("test", 10)):
        for side in ("src", "tgt"):
            with open(os.path.join(REPO, "data-bin", "sample-raw", f"{split}.{side}"), encoding="utf-8") as f:
                (raw / f"{split}.{side}").write_text("".join(next(f) for _ in range(n)), encoding="utf-8")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "PYTHON": sys.executable}
    out = tmp_path / "bin"
    proc = subprocess.run(["bash", "scripts/prepare_sample.sh", str(raw), str(out), "300"], cwd=REPO,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for split, n in (("train", 120), ("valid", 10), ("test", 10)):
        pieces = (tmp_path / "bin.spm" / f"{split}.tgt").read_text(encoding="utf-8").splitlines()
        assert len(pieces) == n and all(p.startswith("▁") for p in pieces if p)
        assert (out / f"{split}.src-tgt.src.idx").exists()
    assert (out / "spm.model").exists()


def test_gpu_bench_says_when_there_is_no_gpu(tmp_path):
    """scripts/gpu_bench.sh runs the CUDA benchmark in one step; on a machine without CUDA it runs
    nothing, says so in one line and exits 3 (on a GPU machine it is run by hand, not here)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: gpu_bench.sh would run the full benchmark")
    proc = subprocess.run(["bash", "scripts/gpu_bench.sh", str(tmp_path), str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 3 and proc.stderr.strip() == "gpu_bench.sh: torch sees no CUDA device; nothing run"
    assert not (tmp_path / "out").exists()


def test_profile_generation_attributes_time_to_the_part_that_spends_it(trained, monkeypatch):
    """scripts/profile_generation.py: a decoder layer slowed by 20 ms a call is charged those 20 ms and
    the other parts are not; the parts and the time outside them add up to the whole call."""
    import time

    import torch

    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import profile_generation
    from benchmark import batches, load, timing_ids

    _, dest, ckpt, _ = trained
    model, task = load(str(ckpt / "checkpoint_last.pt"), str(dest))
    model.eval()
    gen = task.build_generator([model], None)
    samples = batches(task, "valid", timing_ids([(model, task)], "valid", 4), 1, torch.device("cpu"))
    plain = profile_generation.profile(model, task, gen, samples, torch.device("cpu"), warmup=1)
    layer = model.decoder.layers[1]
    forward = layer.forward

    def slow(*a, **kw):
        time.sleep(0.02)
        return forward(*a, **kw)

    monkeypatch.setattr(layer, "forward", slow)
    slowed = profile_generation.profile(model, task, gen, samples, torch.device("cpu"), warmup=1)
    labels = {"encoder", "decoder layer 1", "decoder layer 2", "off-ramps / output projection"}
    assert labels <= set(slowed)
    assert slowed["decoder layer 2"] - plain["decoder layer 2"] >= 19.0
    assert abs(slowed["encoder"] - plain["encoder"]) < 10.0 and slowed["decoder layer 1"] < 10.0
    for figures in (plain, slowed):
        parts = sum(v for k, v in figures.items() if not k.startswith(("whole", "outside")))
        assert parts + figures["outside the model's modules"] == pytest.approx(figures["whole call"])
        assert figures["outside the model's modules"] >= 0


def test_train_speed_reads_fairseq_intervals_by_hand():
    """scripts/train_speed.py: updates/s is total updates over total time after the skipped start,
    each interval's time being its updates over its logged ups; tokens/s weights wpb the same way."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import train_speed

    log = ["2026 | INFO | train_inner | epoch 001:     10 / 99 loss=9, ups=0.5, wpb=100, bsz=4, num_updates=10, wall=20",
           "2026 | INFO | train_inner | epoch 001:     20 / 99 loss=9, ups=1, wpb=200, bsz=4, num_updates=20, wall=30",
           "2026 | INFO | train | epoch 001 | loss 9 | ups 9 | wpb 1 | num_updates 30",  # epoch summary: not an interval
           "2026 | INFO | train_inner | epoch 002:     10 / 99 loss=9, ups=2, wpb=300, bsz=4, num_updates=40, wall=40"]
    rows = train_speed.intervals(log)
    assert rows == [(10, 0.5, 100.0), (20, 1.0, 200.0), (40, 2.0, 300.0)]
    got = train_speed.speed(rows, skip=10)
    # timed: 10 updates at 1/s (10 s) and 20 updates at 2/s (10 s)
    assert got["timed_updates"] == 30 and got["timed_s"] == pytest.approx(20.0)
    assert got["updates_per_s"] == pytest.approx(1.5)
    assert got["tokens_per_s"] == pytest.approx((10 * 200 + 20 * 300) / 20.0)
    with pytest.raises(ValueError, match="--updates"):
        train_speed.speed(rows, skip=40)
    with pytest.raises(SystemExit, match="unknown modifier"):
        train_speed.system_flags("elmer-soft+fp8", {"canvas_len_a": 0, "canvas_len_b": 8})
    with pytest.raises(SystemExit, match="ELMER systems only"):
        train_speed.system_flags("ar+bf16", {"canvas_len_a": 0, "canvas_len_b": 8})
    # +ctc trains on compare.py's CTC canvas: ceil(1.5 x 21) = 32 slots, as the debsum CTC student
    flags = train_speed.system_flags("elmer-soft-glat+d0+ctc", {"canvas_len_a": 0, "canvas_len_b": 21})
    assert flags[flags.index("--canvas-len-b") + 1] == "32" and "--ctc" in flags
    assert flags[flags.index("--dropout") + 1] == "0"


def test_train_speed_end_to_end_on_the_sample(data_bin, tmp_path):
    """Two systems through fairseq-train (the AR and ELMER-Soft with --autocast-bf16), one JSON record each."""
    import shutil

    dest = tmp_path / "bin"
    shutil.copytree(data_bin[1], dest)  # the fixture's folder is shared: the canvas rule goes in a copy
    (dest / "canvas.env").write_text("CANVAS_A=0\nCANVAS_B=8\n")
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "train_speed.py"), "--data", str(dest),
                           "--size", "tiny", "--updates", "6", "--interval", "2", "--skip", "2",
                           "--systems", "ar,elmer-soft+bf16", "--json", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [r["system"] for r in results] == ["ar", "elmer-soft+bf16"]
    assert all(r["updates_per_s"] > 0 and r["timed_updates"] == 4 for r in results)
    assert "--autocast-bf16" in results[1]["command"] and "--autocast-bf16" not in results[0]["command"]
    assert "| elmer-soft+bf16 |" in proc.stdout


def test_bf16_loss_check_compares_the_same_batches_both_ways(trained, tmp_path):
    """scripts/bf16_loss_check.py: both losses from the task's validation step on the same batches; the
    bf16 one differs (autocast really ran) by little, and the task's option is restored afterwards."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import bf16_loss_check

    _, dest, ckpt, _ = trained
    out = tmp_path / "check.json"
    result = bf16_loss_check.main(["--path", str(ckpt / "checkpoint_last.pt"), "--data", str(dest), "--json", str(out)])
    assert json.loads(out.read_text())["batches"] == result["batches"] >= 1
    assert result["diff_bits"] != 0 and abs(result["diff_bits"]) < 0.05 * result["fp32_bits"]
    assert result["diff_bits"] == pytest.approx(result["bf16_bits"] - result["fp32_bits"])


def test_benchmark_times_bf16_generation_on_its_own_copy(trained):
    """benchmark.py --bf16-generation-too: the extra row's generator casts its own copy of the model, so
    the other rows keep timing the fp32 model."""
    tmp, dest, ckpt, _ = trained
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import benchmark

    args = argparse.Namespace(data=str(dest), length=None, elmer=None, size=None, nat=None, ar=None, thresholds=[],
                              elmer_soft=str(ckpt / "checkpoint_last.pt"), compile=False, masked_too=False,
                              bf16_generation_too=True)
    systems = benchmark.systems(args, torch.device("cpu"), torch.float32)
    rows = {name: (model, task, gen) for name, model, task, gen, _ in systems}
    model, task, gen = rows["ELMER soft, --bf16-generation"]
    plain = rows["ELMER soft"][0]
    assert model is not plain
    sample = benchmark.batches(task, "test", [0, 1], 2, torch.device("cpu"))[0]
    hypos = benchmark.run_one(model, task, gen, sample, False)
    assert len(hypos) == 2
    assert model.decoder.embed_tokens.weight.dtype == torch.bfloat16
    assert plain.decoder.embed_tokens.weight.dtype == torch.float32
