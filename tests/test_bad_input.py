"""Bad input gets a clear error or a counted, logged decision (through the real CLIs)."""

import re

from test_cli import TRAIN_FLAGS, generate_args, ok, run


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
    dest = preprocess(tmp_path, PAIRS)
    cases = [
        (["--lplm-samples", "0"], "--lplm-samples must be >= 1"),
        (["--exit-threshold", "-1"], "--exit-threshold must be >= 0"),
        (["--canvas-len-a", "0", "--canvas-len-b", "0"], "give a canvas of length < 1"),
        (["--model-exit-threshold", "-0.5"], "--model-exit-threshold must be >= 0"),
        (["--soft-gold-prob", "1.5"], "--soft-gold-prob must lie in [0, 1]"),
    ]
    for extra, message in cases:  # argparse keeps the last value of a repeated flag
        proc = run("fairseq_cli.train", [str(dest)] + TRAIN_FLAGS + extra + ["--max-update", "1", "--save-dir", str(tmp_path / "x")])
        assert proc.returncode != 0, extra
        assert message in proc.stderr, (extra, proc.stderr[-1500:])


def test_non_utf8_interactive_lines_are_replaced_and_counted(caplog):
    """fairseq-interactive hands undecodable stdin bytes over as lone surrogates; the task's
    tokenizer guard replaces them with U+FFFD, counts the line and says so."""
    from elmer_fairseq.nat_early_exit_task import Utf8Guard

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
