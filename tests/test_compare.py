"""The side-by-side quality harness (scripts/compare.py) end to end on a 200-pair slice, its
distillation step, and the scoring helpers it reports."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO
from elmer_fairseq.distill import pairs_from_generate_log
from elmer_fairseq.score import collapse_words, score, text_shape


def harness():
    """scripts/compare.py, imported as a module."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import compare

    return compare


def fake_work(tmp_path, checkpoints=None):
    """tmp_path/work with bin/canvas.json (T = 9) and, per {system: bytes}, WORK/<system>/checkpoint_last.pt."""
    work = tmp_path / "work"
    (work / "bin").mkdir(parents=True)
    (work / "bin" / "canvas.json").write_text(json.dumps({"canvas_len_a": 0, "canvas_len_b": 9, "mean_target": 4}))
    for name, content in (checkpoints or {}).items():
        (work / name).mkdir()
        (work / name / "checkpoint_last.pt").write_bytes(content)
    return work


def record_runs(monkeypatch, compare):
    """compare.run replaced by a recorder of (command, env); distill.sh's OUT folder is created as it would be."""
    calls = []

    def run(cmd, out=None, env=None):
        calls.append((cmd, env))
        if env and "OUT" in env:
            os.makedirs(env["OUT"], exist_ok=True)

    monkeypatch.setattr(compare, "run", run)
    return calls


def harness_args(work, **changes):
    """compare.py's parsed arguments for a tiny run in ``work`` (8 updates, teacher 20), with ``changes``."""
    import argparse

    values = dict(work=str(work), max_update=8, teacher_updates=20, size="tiny", lr=5e-4, warmup=4, student_lr=5e-4,
                  student_warmup=4, device="cpu", max_tokens=4096, save_every=4, seed=1, kd_nbest=1, kd_lenpen=1.0,
                  teacher_system="ar")
    values.update(changes)
    return argparse.Namespace(**values)


def test_collapse_words_and_text_shape_by_hand():
    assert collapse_words("data files for for data") == "data files for data"
    assert collapse_words("a a a") == "a"
    assert collapse_words("") == ""
    shape = text_shape(["x x y", "z"], ["x y z w", "a b"])
    assert shape["length_ratio"] == pytest.approx(4 / 6)
    assert shape["repeat_rate"] == pytest.approx(100 * 1 / 4)
    # collapsing repeats can only help ROUGE-L here: "the the cat" vs "the cat"
    raw = score(["the the cat"], ["the cat"])["ROUGE-L"]
    collapsed = score(["the the cat"], ["the cat"], collapse_words=True)["ROUGE-L"]
    assert collapsed == pytest.approx(100.0) and raw < 100.0


def test_distill_pairs_follow_sentence_ids_and_refuse_gaps():
    log = ["S-1\tb c", "H-1\t-0.5\tB", "S-0\ta", "H-0\t-0.1\tA", "H-0\t-0.9\tworse", "P-0\t-0.1"]
    assert pairs_from_generate_log(log) == [("a", "A"), ("b c", "B")]
    with pytest.raises(ValueError, match="source or a hypothesis but not both"):
        pairs_from_generate_log(["S-0\ta", "H-0\t-1\tA", "S-1\tb"])


def test_distill_keeps_the_reference_where_the_teacher_loops(tmp_path, capsys):
    from elmer_fairseq import distill

    log = tmp_path / "gen.txt"
    log.write_text("\n".join([
        "S-0\tsrc zero", "T-0\tgold zero", "H-0\t-0.1\tfine output here",          # repeat rate 0: kept
        "S-1\tsrc one", "T-1\tgold one", "H-1\t-0.2\tos os os os lib",             # 3 of 5 repeat: reference
        "S-2\tsrc two", "T-2\tgold two", "H-2\t-0.3\t",                            # empty: reference
        "S-3\tsrc three", "T-3\tgold three", "H-3\t-0.4\ta a b c d e f g h i",     # 1 of 10 repeats: kept
    ]) + "\n", encoding="utf-8")
    distill.main([str(log), str(tmp_path / "out"), "--expect", "4", "--max-repeat-rate", "0.2", "--collapse-repeats"])
    assert (tmp_path / "out.tgt").read_text().splitlines() == ["fine output here", "gold one", "gold two", "a b c d e f g h i"]
    assert (tmp_path / "out.src").read_text().splitlines() == ["src zero", "src one", "src two", "src three"]
    said = capsys.readouterr().out
    assert "2 references kept where the teacher looped or wrote nothing" in said and "1 consecutive repeated pieces dropped" in said


def _lcs_by_enumeration(a, b):
    """The longest common subsequence by trying every subsequence of ``a`` (an oracle for tiny inputs)."""
    best = 0
    for mask in range(1 << len(a)):
        sub = [x for i, x in enumerate(a) if mask >> i & 1]
        it = iter(b)
        if all(x in it for x in sub):  # ``sub`` is a subsequence of ``b``
            best = max(best, len(sub))
    return best


def test_lcs_f1_against_enumerated_subsequences():
    import random

    from elmer_fairseq.distill import lcs_f1

    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        expected = 2 * _lcs_by_enumeration(a, b) / (len(a) + len(b)) if a and b else 0.0
        assert lcs_f1(a, b) == pytest.approx(expected), (a, b)


def test_distill_selects_the_teachers_candidate_nearest_the_reference(tmp_path, capsys):
    from elmer_fairseq import distill

    log = tmp_path / "gen.txt"
    log.write_text("\n".join([
        "S-0\tsrc zero", "T-0\tpython library for maps",
        "H-0\t-0.1\tlibrary for maps", "H-0\t-0.2\tpython library for maps", "H-0\t-0.3\tpython",
        "S-1\tsrc one", "T-1\tgold one",                                          # no candidate overlaps: the first
        "H-1\t-0.1\tfirst out", "H-1\t-0.2\tsecond out",
        "S-2\tsrc two", "T-2\ta b",                                               # a tie (F1 2/3 each): the first
        "H-2\t-0.1\ta", "H-2\t-0.2\tb",
    ]) + "\n", encoding="utf-8")
    distill.main([str(log), str(tmp_path / "out"), "--expect", "3", "--select-by-reference"])
    assert (tmp_path / "out.tgt").read_text().splitlines() == ["python library for maps", "first out", "a"]
    said = capsys.readouterr().out
    assert "1 targets are not the teacher's first hypothesis (nearest the reference among up to 3)" in said
    assert "pieces per target 2.00 first, 2.33 chosen, references 2.67" in said
    # without the flag the first (best) hypothesis of each id is the target, as before
    distill.main([str(log), str(tmp_path / "plain"), "--expect", "3"])
    assert (tmp_path / "plain.tgt").read_text().splitlines() == ["library for maps", "first out", "a"]
    (tmp_path / "noref.txt").write_text("S-0\ts\nH-0\t-0.1\th\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="needs the references"):
        distill.main([str(tmp_path / "noref.txt"), str(tmp_path / "x"), "--select-by-reference"])


def test_harness_end_to_end_on_a_200_pair_slice(tmp_path):
    work = tmp_path / "work"
    cmd = [sys.executable, os.path.join(REPO, "scripts", "compare.py"), os.path.join(REPO, "data-bin", "sample-raw"),
           "--work", str(work), "--size", "tiny", "--max-update", "8", "--save-every", "4", "--warmup", "4",
           "--train-limit", "200", "--valid-limit", "16", "--vocab", "300", "--bs1-sentences", "2",
           "--systems", "ar,elmer-soft-kd-glat,elmer-soft-kd-glat-d0-ctc", "--calibration-pairs", "50"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((work / "compare.json").read_text())
    rows = {(r["system"], r["decode"]): r for r in report["rows"]}
    assert set(rows) == {("ar", "beam 4"), ("ar", "greedy"), ("elmer-soft-kd-glat", "first </s>"),
                         ("elmer-soft-kd-glat", "most probable </s>"), ("elmer-soft-kd-glat", "median </s>"),
                         ("elmer-soft-kd-glat", "first </s>, eos penalty from train"),
                         ("elmer-soft-kd-glat", "first </s>, eos penalty from train, repeats collapsed"),
                         ("elmer-soft-kd-glat", "no repeated neighbours (4 best), first </s>"),
                         ("elmer-soft-kd-glat", "no repeated neighbours (4 best), eos penalty from train (words)"),
                         ("elmer-soft-kd-glat", "no repeated neighbours (4 best), median </s>"),
                         ("elmer-soft-kd-glat", "no repeated neighbours (4 best), length quantile from train (words)"),
                         ("elmer-soft-kd-glat",
                          "no repeated neighbours (4 best), length quantile from train (words, ratio 0.95)"),
                         ("elmer-soft-kd-glat-d0-ctc", "ctc (repeats merged, blanks dropped)"),
                         ("elmer-soft-kd-glat-d0-ctc", "ctc, blank penalty from train (words, ratio 0.95)")}
    for r in rows.values():
        assert 0.0 <= r["ROUGE-L"] <= 100.0 and 0.0 <= r["ROUGE-L (repeats removed)"] <= 100.0
        assert r["length_ratio"] >= 0 and r["bs1_ms"] > 0 and r["updates"] == 8  # 8 updates may write nothing
    assert rows[("elmer-soft-kd-glat", "first </s>, eos penalty from train")]["eos_penalty"] >= 0
    collapsed = json.loads((work / "elmer-soft-kd-glat" / "calibration.collapsed.checkpoint_last.pt.json").read_text())
    assert collapsed["collapse_repeats"] and collapsed["subset"] == "train"
    words = json.loads((work / "elmer-soft-kd-glat" / "calibration.k4.words.checkpoint_last.pt.json").read_text())
    assert words["unit"] == "words" and words["no_repeat_neighbours"] == 4 and not words["collapse_repeats"]
    flags = rows[("elmer-soft-kd-glat", "no repeated neighbours (4 best), eos penalty from train (words)")]["flags"]
    assert flags == ["--length-rule", "first-eos", "--eos-penalty", str(words["eos_penalty"]), "--no-repeat-neighbours", "4"]
    quantile = json.loads((work / "elmer-soft-kd-glat" / "calibration.k4.words.quantile.ratio0.95.checkpoint_last.pt.json").read_text())
    assert quantile["rule"] == "quantile" and quantile["target_ratio"] == 0.95 and 0 < quantile["length_quantile"] < 1
    label = "no repeated neighbours (4 best), length quantile from train (words, ratio 0.95)"
    assert rows[("elmer-soft-kd-glat", label)]["flags"] == [
        "--length-rule", "quantile", "--length-quantile", str(quantile["length_quantile"]), "--no-repeat-neighbours", "4"]
    assert rows[("elmer-soft-kd-glat", label)]["length_quantile"] == quantile["length_quantile"]
    # the CTC student trained with --ctc on a canvas 1.5 times the data's, read as CTC reads it
    ctc_cfg = torch.load(work / "elmer-soft-kd-glat-d0-ctc" / "checkpoint_last.pt", weights_only=True)["cfg"]["model"]
    canvas_b = json.loads((work / "bin" / "canvas.json").read_text())["canvas_len_b"]
    assert ctc_cfg["ctc"] and ctc_cfg["canvas_len_b"] == math.ceil(1.5 * canvas_b)
    blank = json.loads((work / "elmer-soft-kd-glat-d0-ctc" / "calibration.words.blank-penalty.ratio0.95.checkpoint_last.pt.json")
                       .read_text())
    assert blank["rule"] == "blank-penalty" and blank["subset"] == "train"
    assert rows[("elmer-soft-kd-glat-d0-ctc", "ctc, blank penalty from train (words, ratio 0.95)")]["flags"] == [
        "--blank-penalty", str(blank["blank_penalty"])]
    elmer = rows[("elmer-soft-kd-glat", "most probable </s>")]
    assert elmer["time_matched_updates"] in (0, 4, 8) and "time_matched_rougeL" in elmer
    # the distilled training targets are the teacher's beam outputs, one per training pair
    kd_tgt = (work / "bin-kd" / "text" / "train.tgt").read_text().splitlines()
    ref_tgt = (work / "text" / "train.bpe.tgt").read_text().splitlines()
    assert len(kd_tgt) == len(ref_tgt) == 200 and kd_tgt != ref_tgt
    assert "| system | decode | R-1 |" in (work / "compare.md").read_text()
    # a second run finds every stage done and only reprints the table
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "fairseq-train" not in again.stdout
    assert json.loads((work / "compare.json").read_text())["rows"] == report["rows"]
    # --average-last 2: every system (the AR too) decoded again with the mean of its checkpoints at 4 and 8 updates
    avg = subprocess.run(cmd + ["--average-last", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert avg.returncode == 0, avg.stdout[-3000:] + avg.stderr[-3000:]
    assert "fairseq-train" not in avg.stdout
    averaged = {(r["system"], r["decode"]): r for r in json.loads((work / "compare-avg2.json").read_text())["rows"]}
    assert set(averaged) == set(rows) | {(s, f"{d}, mean of the last 2 checkpoints") for s, d in rows}
    assert all(averaged[key]["ROUGE-L"] == r["ROUGE-L"] for key, r in rows.items())  # the last checkpoint, cached
    for system in ("ar", "elmer-soft-kd-glat"):
        state = torch.load(work / system / "checkpoint_avg2.pt", weights_only=True)
        # update 8 may also end an epoch: fairseq then writes no checkpoint_E_8.pt and checkpoint_last.pt stands in
        first, second = (os.path.basename(p) for p in state["averaged_from"])
        assert first.endswith("_4.pt") and (second.endswith("_8.pt") or second == "checkpoint_last.pt")
        assert all(r["checkpoint"].endswith("checkpoint_avg2.pt") == (r["averaged"] == 2)
                   for (s, _), r in averaged.items() if s == system)


def test_kdmix_data_is_the_distilled_then_the_original_training_pairs(data_bin, tmp_path):
    """compare.py's ``kdmix`` data folder: one binarized train split holding the distilled pairs followed
    by the original ones, item for item; valid and the dictionaries are the original folder's."""
    import shutil

    from fairseq.data import data_utils

    compare = harness()
    _, dest = data_bin
    work = tmp_path / "work"
    work.mkdir()
    (work / "bin").symlink_to(dest)
    kd = work / "bin-kd"
    kd.mkdir()
    for side in ("src", "tgt"):  # a stand-in for the distilled pairs: the valid split
        for ext in ("bin", "idx"):
            shutil.copy(dest / f"valid.src-tgt.{side}.{ext}", kd / f"train.src-tgt.{side}.{ext}")
    compare.mix(harness_args(work, max_update=1800, teacher_updates=1800))
    for side in ("src", "tgt"):
        merged = data_utils.load_indexed_dataset(str(work / "bin-kdmix" / f"train.src-tgt.{side}"), None)
        first = data_utils.load_indexed_dataset(str(dest / f"valid.src-tgt.{side}"), None)
        second = data_utils.load_indexed_dataset(str(dest / f"train.src-tgt.{side}"), None)
        assert len(merged) == len(first) + len(second) == 8 + 48
        want = [first[i] for i in range(len(first))] + [second[i] for i in range(len(second))]
        assert all(merged[i].tolist() == w.tolist() for i, w in enumerate(want))
    assert (work / "bin-kdmix" / "dict.tgt.txt").read_text() == (dest / "dict.tgt.txt").read_text()
    assert (work / "bin-kdmix" / "valid.src-tgt.tgt.idx").read_bytes() == (dest / "valid.src-tgt.tgt.idx").read_bytes()
    assert not (work / "bin-kdmix" / "train1.src-tgt.src.idx").exists()


def test_teacher_trained_on_resumes_the_baseline_and_feeds_its_own_kd_folders(tmp_path, monkeypatch):
    """--teacher-updates N: the teacher is the baseline's last checkpoint trained on to N updates in
    WORK/ar-tN (fairseq-train resumes from the copied checkpoint_last.pt), distills into WORK/bin-kd-tN,
    and the students' folders carry the suffix; the baseline keeps WORK/ar. Fewer updates than
    --max-update are refused."""
    compare = harness()
    work = fake_work(tmp_path, {"ar": b"baseline"})
    calls = record_runs(monkeypatch, compare)
    args = harness_args(work)
    compare.train_teacher(args)
    cmd, _ = calls[0]
    assert (work / "ar-t20" / "checkpoint_last.pt").read_bytes() == b"baseline"
    assert cmd[cmd.index("--save-dir") + 1] == str(work / "ar-t20") and cmd[cmd.index("--max-update") + 1] == "20"
    assert "--user-dir" in cmd and "--arch" in cmd and cmd[cmd.index("--arch") + 1] == "transformer"
    compare.distill(args)
    _, env = calls[1]
    assert env["TEACHER"] == str(work / "ar-t20" / "checkpoint_last.pt") and env["OUT"] == str(work / "bin-kd-t20")
    assert env["NBEST"] == "1" and env["LENPEN"] == "1"
    assert compare.folder(args, "elmer-soft-kd-glat") == str(work / "elmer-soft-kd-glat-t20")
    assert compare.folder(args, "ar") == str(work / "ar") and compare.folder(args, compare.TEACHER) == str(work / "ar-t20")
    assert compare.data_dir(args, "elmer-soft-kdmix-glat") == str(work / "bin-kdmix-t20")
    same = harness_args(work, teacher_updates=8)
    assert compare.folder(same, "elmer-soft-kd-glat") == str(work / "elmer-soft-kd-glat")
    # --kd-nbest 4: the same teacher writes its 4 best, the targets and students get their own folders
    best = harness_args(work, kd_nbest=4)
    compare.distill(best)
    _, env = calls[2]
    assert env["NBEST"] == "4" and env["OUT"] == str(work / "bin-kd-t20-best-of-4")
    assert env["TEACHER"] == str(work / "ar-t20" / "checkpoint_last.pt")
    assert compare.folder(best, "elmer-soft-kd-glat") == str(work / "elmer-soft-kd-glat-t20-best-of-4")
    assert compare.folder(best, compare.TEACHER) == str(work / "ar-t20")
    # --kd-lenpen 2.5: the teacher's beam favours longer outputs; own data and student folders again
    longer = harness_args(work, kd_nbest=4, kd_lenpen=2.5)
    compare.distill(longer)
    _, env = calls[3]
    assert env["LENPEN"] == "2.5" and env["OUT"] == str(work / "bin-kd-t20-best-of-4-lenpen-2.5")
    assert compare.folder(longer, "elmer-soft-kd-glat") == str(work / "elmer-soft-kd-glat-t20-best-of-4-lenpen-2.5")
    assert compare.data_dir(longer, "elmer-soft-kdmix-glat") == str(work / "bin-kdmix-t20-best-of-4-lenpen-2.5")
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path), "--work", str(work), "--max-update", "8", "--teacher-updates", "4"])
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path), "--work", str(work), "--kd-nbest", "0"])
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path), "--work", str(work), "--kd-lenpen", "0"])


def test_ar_without_dropout_is_the_ar_with_dropout_0_last(tmp_path):
    """ar-d0 trains the same fairseq transformer as the baseline with --dropout 0 after the common
    --dropout 0.1 (argparse keeps the last), on the original pairs, into WORK/ar-d0, and is decoded as an AR."""
    compare = harness()
    work = fake_work(tmp_path)
    args = harness_args(work, teacher_updates=8)
    base, d0 = compare.train_flags(args, "ar"), compare.train_flags(args, "ar-d0")
    assert d0 == base + ["--dropout", "0"] and base[base.index("--arch") + 1] == "transformer"
    assert [d0[i + 1] for i, f in enumerate(d0) if f == "--dropout"] == ["0.1", "0"]
    assert compare.folder(args, "ar-d0") == str(work / "ar-d0") and compare.data_dir(args, "ar-d0") == str(work / "bin")
    assert compare.is_ar("ar-d0") and compare.is_ar(compare.TEACHER) and not compare.is_ar("elmer-soft-kd-glat-d0")


def test_teacher_system_ar_d0_resumes_the_ar_without_dropout_into_its_own_folders(tmp_path, monkeypatch):
    """--teacher-system ar-d0: the teacher is WORK/ar-d0's last checkpoint trained on with ar-d0's flags
    (--dropout 0 last) into WORK/ar-d0-tN; its data and students carry '-ar-d0-tN'; without
    --teacher-updates the teacher is WORK/ar-d0 itself."""
    compare = harness()
    work = fake_work(tmp_path, {"ar": b"baseline", "ar-d0": b"no dropout"})
    calls = record_runs(monkeypatch, compare)
    args = harness_args(work, kd_nbest=4, teacher_system="ar-d0")
    compare.train_teacher(args)
    cmd, _ = calls[0]
    assert (work / "ar-d0-t20" / "checkpoint_last.pt").read_bytes() == b"no dropout"
    assert cmd[cmd.index("--save-dir") + 1] == str(work / "ar-d0-t20") and cmd[cmd.index("--max-update") + 1] == "20"
    assert [cmd[i + 1] for i, f in enumerate(cmd) if f == "--dropout"][-1] == "0"
    compare.distill(args)
    _, env = calls[1]
    assert env["TEACHER"] == str(work / "ar-d0-t20" / "checkpoint_last.pt")
    assert env["OUT"] == str(work / "bin-kd-ar-d0-t20-best-of-4")
    assert compare.folder(args, "elmer-soft-kd-glat-d0") == str(work / "elmer-soft-kd-glat-d0-ar-d0-t20-best-of-4")
    assert compare.folder(args, compare.TEACHER) == str(work / "ar-d0-t20") and compare.folder(args, "ar") == str(work / "ar")
    itself = harness_args(work, teacher_system="ar-d0", teacher_updates=8)
    assert compare.folder(itself, compare.TEACHER) == str(work / "ar-d0")
    assert compare.data_dir(itself, "elmer-soft-kd-glat") == str(work / "bin-kd-ar-d0")


def test_student_schedule_trains_elmer_at_its_own_lr_and_leaves_the_ar_and_teacher_alone(tmp_path, monkeypatch):
    """--student-lr/--student-warmup: the ELMER systems train at their own peak learning rate and warm-up
    into folders that say so; the AR systems and the teacher keep --lr/--warmup and their folders; by
    default (main) the students' schedule is the AR's; a non-positive learning rate is refused."""
    compare = harness()
    work = fake_work(tmp_path, {"ar": b"baseline"})
    calls = record_runs(monkeypatch, compare)
    args = harness_args(work, student_lr=1e-3, student_warmup=2, kd_nbest=4)

    def option(flags, name):
        values = [flags[i + 1] for i, f in enumerate(flags) if f == name]
        assert len(values) == 1, (name, values)
        return values[0]

    for name in ("ar", "ar-d0"):
        flags = compare.train_flags(args, name)
        assert (option(flags, "--lr"), option(flags, "--warmup-updates")) == ("0.0005", "4")
        assert compare.folder(args, name) == str(work / name)
    for name in ("elmer-soft-glat", "elmer-soft-kd-glat-d0"):
        flags = compare.train_flags(args, name)
        assert (option(flags, "--lr"), option(flags, "--warmup-updates")) == ("0.001", "2")
    assert compare.folder(args, "elmer-soft-glat") == str(work / "elmer-soft-glat-lr0.001-wu2")
    assert compare.folder(args, "elmer-soft-kd-glat-d0") == str(work / "elmer-soft-kd-glat-d0-t20-best-of-4-lr0.001-wu2")
    assert compare.data_dir(args, "elmer-soft-kd-glat-d0") == str(work / "bin-kd-t20-best-of-4")
    compare.train_teacher(args)
    assert (option(calls[0][0], "--lr"), option(calls[0][0], "--warmup-updates")) == ("0.0005", "4")
    assert compare.folder(args, compare.TEACHER) == str(work / "ar-t20")
    same = harness_args(work, kd_nbest=4)
    assert compare.folder(same, "elmer-soft-glat") == str(work / "elmer-soft-glat")
    # main fills the default from --lr/--warmup (checked before anything is trained), refuses lr <= 0
    seen = {}

    def stop(a):
        seen.update(vars(a))
        raise SystemExit(0)

    monkeypatch.setattr(compare, "prepare", stop)
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path), "--work", str(work), "--lr", "2e-4", "--warmup", "7"])
    assert (seen["student_lr"], seen["student_warmup"]) == (2e-4, 7)
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path), "--work", str(work), "--student-warmup", "3"])
    assert (seen["student_lr"], seen["student_warmup"]) == (5e-4, 3)
    seen.clear()
    with pytest.raises(SystemExit) as refused:
        compare.main([str(tmp_path), "--work", str(work), "--student-lr", "0"])
    assert refused.value.code == 2 and not seen


def test_elmer_decode_reads_the_elmer_systems_with_the_chosen_decodes_only():
    """--elmer-decode LABEL (repeatable): ELMER systems are read with those decodes, in the table's order;
    the AR systems and the teacher keep theirs; none given: every decode; an unknown label is refused."""
    compare = harness()

    labels = list(compare.ELMER_DECODES)
    chosen = harness_args("work", elmer_decode=[labels[3], labels[0]])
    assert compare.elmer_decodes(chosen, "elmer-soft-kd-glat-d0") == [labels[0], labels[3]]
    assert compare.elmer_decodes(chosen, "ar") == ["beam 4", "greedy"]
    assert compare.elmer_decodes(chosen, "ar-d0") == ["beam 4", "greedy"]
    assert compare.elmer_decodes(chosen, compare.TEACHER) == ["beam 4"]
    assert compare.elmer_decodes(harness_args("work", elmer_decode=None), "elmer-soft-glat") == labels
    assert compare.elmer_decodes(chosen, "elmer-soft-kd-glat-d0-ctc") == list(compare.CTC_DECODES)
    with pytest.raises(SystemExit) as refused:
        compare.main(["raw", "--elmer-decode", "no such decode"])
    assert refused.value.code == 2


def test_device_cuda_drops_cpu_from_every_tool_and_is_refused_without_cuda(tmp_path, monkeypatch):
    """--device cuda: fairseq-train (baseline, students, the teacher trained on) and the tools get no --cpu,
    distill.sh is told CPU=0; --device cpu (the default) keeps --cpu everywhere and CPU=1; without a CUDA
    device, --device cuda is refused before anything runs."""
    import shutil

    compare = harness()
    work = fake_work(tmp_path, {"ar": b"baseline"})
    calls = record_runs(monkeypatch, compare)
    for device, cpu in (("cuda", False), ("cpu", True)):
        args = harness_args(work, device=device, kd_lenpen=1.0 if cpu else 2.0)
        for name in ("ar", "ar-d0", "elmer-soft-kd-glat"):
            assert ("--cpu" in compare.train_flags(args, name)) is cpu
        assert compare.cpu_flag(args) == (["--cpu"] if cpu else [])
        calls.clear()
        shutil.rmtree(work / "ar-t20", ignore_errors=True)
        compare.train_teacher(args)
        compare.distill(args)
        (teacher, _), (_, env) = calls
        assert ("--cpu" in teacher) is cpu and env["CPU"] == ("1" if cpu else "0")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as refused:
            compare.main([str(tmp_path), "--work", str(work), "--device", "cuda"])
        assert refused.value.code == 2


def test_baseline_ar_d0_is_trained_first_and_the_dropout_ar_only_when_named(tmp_path, monkeypatch):
    """--baseline ar-d0: the AR without dropout is trained first and, as teacher, trained on right after it;
    the dropout-0.1 AR is not trained unless --systems names it (then after the baseline); the default
    baseline 'ar' is trained first even when named last (its students need its distillation)."""
    compare = harness()

    order = []
    monkeypatch.setattr(compare, "prepare", lambda args: None)
    monkeypatch.setattr(compare, "train", lambda args, name: order.append(name))
    monkeypatch.setattr(compare, "train_teacher", lambda args: order.append(compare.TEACHER))
    monkeypatch.setattr(compare, "distill", lambda args: order.append("distill"))

    def walls(args, name):  # the first call after training: stop there
        order.append(f"walls {name}")
        raise SystemExit(0)

    monkeypatch.setattr(compare, "walls", walls)

    def trained(*flags):
        order.clear()
        with pytest.raises(SystemExit):
            compare.main([str(tmp_path), "--work", str(tmp_path / "work"), *flags])
        return list(order)

    assert trained("--baseline", "ar-d0", "--systems", "elmer-soft-kd-glat-d0", "--teacher-system", "ar-d0",
                   "--teacher-updates", "3600") == ["ar-d0", compare.TEACHER, "distill", "elmer-soft-kd-glat-d0",
                                                    "walls ar-d0"]
    assert trained("--baseline", "ar-d0", "--systems", "elmer-soft-glat,ar") == ["ar-d0", "elmer-soft-glat", "ar",
                                                                                 "walls ar-d0"]
    assert trained("--systems", "elmer-soft-kd,ar") == ["ar", "distill", "elmer-soft-kd", "walls ar"]
