"""Bad input gets a clear error or a counted, logged decision (through the real CLIs)."""

import re

import pytest

from helpers import TRAIN_FLAGS, generate_args, ok, run


def preprocess(tmp, pairs, name="data-bin"):
    for split in ("train", "valid", "test"):
        (tmp / f"{split}.src").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
        (tmp / f"{split}.tgt").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    dest = tmp / name
    ok(run("fairseq_cli.preprocess", [
        "--source-lang", "src", "--target-lang", "tgt", "--trainpref", str(tmp / "train"),
        "--validpref", str(tmp / "valid"), "--testpref", str(tmp / "test"),
        "--destdir", str(dest), "--joined-dictionary", "--workers", "1",
    ]))
    return dest


PAIRS = [("the cat sat on the mat", "cat sat"), ("a dog ran", "dog ran"), ("big red dog", "red dog")] * 4


def test_empty_lines_are_counted_and_kept(tmp_path):
    dest = preprocess(tmp_path, PAIRS + [("", "cat"), ("a cat", ""), ("", "")])
    out = ok(run("fairseq_cli.train", [str(dest)] + TRAIN_FLAGS + ["--max-update", "2", "--save-dir", str(tmp_path / "c")]))
    assert "train: 2 empty source and 2 empty target lines (kept)" in out
    gen = ok(run("fairseq_cli.generate", generate_args(dest, tmp_path / "c" / "checkpoint_last.pt")))
    assert len(re.findall(r"^H-\d+\t", gen, re.M)) == len(PAIRS) + 3


def test_long_sources_truncated_with_a_count_or_refused(tmp_path):
    long = " ".join(["dog"] * 40)
    dest = preprocess(tmp_path, PAIRS + [(long, "dog")])
    flags = [str(dest)] + TRAIN_FLAGS + ["--max-source-positions", "16", "--max-update", "2"]
    out = ok(run("fairseq_cli.train", flags + ["--truncate-source", "--save-dir", str(tmp_path / "t")]))
    assert "train: 1 of 13 sources truncated to --max-source-positions 16" in out
    proc = run("fairseq_cli.train", flags + ["--save-dir", str(tmp_path / "r")])
    assert proc.returncode != 0  # fairseq refuses an over-long valid example, naming its size
    assert "--max-source-positions 16" in proc.stdout + proc.stderr
    assert "skip-invalid-size-inputs-valid-test" in proc.stdout + proc.stderr


def test_missing_split_is_named(tmp_path):
    dest = preprocess(tmp_path, PAIRS)
    ok(run("fairseq_cli.train", [str(dest)] + TRAIN_FLAGS + ["--max-update", "1", "--save-dir", str(tmp_path / "c")]))
    proc = run("fairseq_cli.generate", generate_args(dest, tmp_path / "c" / "checkpoint_last.pt", "--gen-subset", "nosuch"))
    assert proc.returncode != 0
    assert f"Dataset not found: nosuch ({dest})" in proc.stderr


def test_nonsense_options_are_rejected_at_start_naming_the_flag(tmp_path):
    """A bad value of a plugin option (model, criterion, task) is argparse's one ``error:`` line and exit
    status 2, before any data is read; a bad combination of two options is named at build time."""
    dest = preprocess(tmp_path, PAIRS)
    cases = [
        (["--lplm-samples", "0"], "argument --lplm-samples: must be >= 1, got 0"),
        (["--soft-gold-prob", "2"], "argument --soft-gold-prob: must lie in [0, 1], got 2.0"),
        (["--early-exit", "nonsense"], "argument --early-exit: invalid choice: 'nonsense'"),
        (["--exit-threshold", "-1"], "argument --exit-threshold: must be >= 0, got -1.0"),
        (["--model-exit-threshold", "-0.5"], "argument --model-exit-threshold: must be >= 0, got -0.5"),
        (["--glat-ratio-end", "1.5"], "argument --glat-ratio-end: must lie in [0, 1], got 1.5"),
    ]
    for extra, message in cases:  # argparse keeps the last value of a repeated flag
        proc = run("fairseq_cli.train", [str(dest)] + TRAIN_FLAGS + extra + ["--max-update", "1", "--save-dir", str(tmp_path / "x")])
        assert proc.returncode == 2, (extra, proc.stderr[-1500:])
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and "error: " + message in errors[0], (extra, errors)
        assert "Traceback" not in proc.stderr, extra
    proc = run("fairseq_cli.train", [str(dest)] + TRAIN_FLAGS + ["--canvas-len-a", "0", "--canvas-len-b", "0", "--max-update", "1",
                                                                 "--save-dir", str(tmp_path / "x")])
    assert proc.returncode != 0
    assert "--canvas-len-a 0.0 --canvas-len-b 0 give a canvas of length < 1" in proc.stderr, proc.stderr[-1500:]


# fairseq's nonautoregressive_translation README command line, with our task, criterion and arch swapped in
# (its --noise is translation_lev's; full_mask is the NAT one), at a tiny size and two updates
NAT_README_LINE = [
    "--ddp-backend=legacy_ddp", "--task", "nat_early_exit", "--criterion", "lplm", "--arch", "elmer_nat",
    "--noise", "full_mask", "--share-all-embeddings", "--optimizer", "adam", "--adam-betas", "(0.9,0.98)",
    "--lr", "0.0005", "--lr-scheduler", "inverse_sqrt", "--stop-min-lr", "1e-09", "--warmup-updates", "10000",
    "--warmup-init-lr", "1e-07", "--label-smoothing", "0.1", "--dropout", "0.3", "--weight-decay", "0.01",
    "--decoder-learned-pos", "--encoder-learned-pos", "--apply-bert-init", "--log-format", "simple",
    "--log-interval", "1", "--fixed-validation-seed", "7", "--max-tokens", "8000", "--save-interval-updates", "10000",
    "--max-update", "2",
]
TINY = ["--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
        "--decoder-ffn-embed-dim", "64", "--encoder-layers", "2", "--decoder-layers", "2",
        "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--canvas-len-b", "4",
        "--cpu", "--num-workers", "0"]


def test_fairseq_nat_command_line_trains_with_elmer_swapped_in(tmp_path):
    dest = preprocess(tmp_path, PAIRS)
    user_dir = TRAIN_FLAGS[TRAIN_FLAGS.index("--user-dir") + 1]
    out = ok(run("fairseq_cli.train", [str(dest), "--user-dir", user_dir, "--save-dir", str(tmp_path / "c")]
                 + NAT_README_LINE + TINY))
    assert "num_updates 2" in out or "num_updates=2" in out, out[-2000:]


def test_unsupported_model_flags_are_refused_naming_them(tmp_path):
    dest = preprocess(tmp_path, PAIRS)
    for flag, value in [("--length-loss-factor", "0.1"), ("--src-embedding-copy", None)]:
        extra = [flag] + ([value] if value else [])
        proc = run("fairseq_cli.train", [str(dest)] + TRAIN_FLAGS + extra + ["--max-update", "1", "--save-dir", str(tmp_path / "x")])
        assert proc.returncode == 2, (flag, proc.stderr[-1500:])
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and f"error: {flag} is not supported: " in errors[0], errors
        assert "Traceback" not in proc.stderr


def test_option_checks_apply_without_argparse_too():
    """Configurations that never met argparse (a checkpoint's, the hub's) get the same checks."""
    import argparse

    from elmer_fairseq.lplm_criterion import LPLMCriterionConfig
    from elmer_fairseq.option_checks import check_fields

    ok_cfg = argparse.Namespace(lplm_samples=1, label_smoothing=0.1, glat_ratio=0.5, glat_ratio_end=0.0)
    check_fields(ok_cfg, LPLMCriterionConfig)
    for name, value, message in [("lplm_samples", 0, "--lplm-samples must be >= 1, got 0"),
                                 ("label_smoothing", 1.0, "--label-smoothing must lie in [0, 1), got 1.0"),
                                 ("glat_ratio", -0.1, "--glat-ratio must lie in [0, 1], got -0.1")]:
        bad = argparse.Namespace(**{**vars(ok_cfg), name: value})
        with pytest.raises(ValueError) as err:
            check_fields(bad, LPLMCriterionConfig)
        assert str(err.value) == message


def test_non_utf8_interactive_lines_are_replaced_and_counted(caplog):
    """fairseq-interactive hands undecodable stdin bytes over as lone surrogates; the task's
    tokenizer guard replaces them with U+FFFD, counts the line and says so."""
    from elmer_fairseq.generation_io import Utf8Guard

    class Upper:
        def encode(self, x):
            return x.upper()

        def decode(self, x):
            return x.lower()

    guard = Utf8Guard(Upper())
    bad = b"caf\xe9 ok".decode("utf-8", "surrogateescape")
    with caplog.at_level("WARNING"):
        assert guard.encode("fine") == "FINE"
        assert guard.encode(bad) == "CAF\ufffd OK"
    assert guard.lines_seen == 2 and guard.lines_replaced == 1
    assert "input line 2 is not valid UTF-8: 1 undecodable byte(s)" in caplog.text
    assert guard.decode("ABC") == "abc"
    assert Utf8Guard(None).encode(bad) == "caf\ufffd ok"
