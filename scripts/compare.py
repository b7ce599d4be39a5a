#!/usr/bin/env python3
"""Side-by-side quality harness: ELMER variants against the stock fairseq ``transformer``.

    python scripts/compare.py ../shared/data/debsum --work runs/debsum            # everything
    python scripts/compare.py RAW_DIR --systems ar,elmer-soft-kd --max-update 1800
    bash scripts/compare.sh RAW_DIR                                              # the same

RAW_DIR holds ``{train,valid}.{src,tgt}`` (plain or ``.xz``), one example a line, and optionally a
sentencepiece ``*.model`` with its fairseq ``dict*.txt`` (else a sentencepiece model of ``--vocab``
pieces is trained on the training split). Every system is trained by ``fairseq-train`` at the same
size (``--size``), optimizer, batch and number of updates, with no validation during training (the
last checkpoint is scored: nothing is picked on the split we report). Then ``fairseq-generate`` writes
the valid split, ``elmer-score`` scores it, and one table is printed and written to
``WORK/compare.{json,md}``:

- R-1/R-2/R-L (rouge-score F1 x100, stemmed, on detokenized text), and R-L after removing consecutive
  repeated words from every system's output alike (the released ELMER evaluation does this);
- hypothesis/reference length ratio (words, corpus total) and the repeated-word rate (share of words
  equal to the word before);
- batch-1 ms per sentence (median, ``scripts/benchmark.py`` on the first ``--bs1-sentences``);
- time-matched R-L: each ELMER system read at its last checkpoint (one every ``--save-every`` updates)
  saved within the AR's training wall-clock.

Systems whose name contains ``kd`` train on the AR's beam-4 outputs for the training split
(``scripts/distill.sh`` with the AR as teacher); ``kdmix``: on those and the original pairs together.
With ``--teacher-updates N`` (N > ``--max-update``) the teacher is the same AR trained on to N updates
(``WORK/ar-tN``, resumed from the baseline's last checkpoint: same size, data and schedule), its data
``WORK/bin-kd-tN``, and the students' folders ``WORK/<system>-tN``; the teacher's own beam-4 scores are a
row of the table. ``--teacher-system ar-d0`` makes the AR without dropout the teacher (folders
``WORK/ar-d0-tN``, ``WORK/bin-kd-ar-d0-tN``, ``WORK/<system>-ar-d0-tN``). The baseline every system is compared with stays the AR at ``--max-update``: ``ar`` (fairseq's dropout 0.1), or
with ``--baseline ar-d0`` the AR without dropout (then ``ar`` is trained only if ``--systems`` names it).
``--student-lr``/``--student-warmup`` give the ELMER systems their own learning rate and warm-up (folders
``WORK/<system>...-lrLR-wuW``) while the AR systems and the teacher keep ``--lr``/``--warmup``, in the same run.
``--elmer-decode LABEL`` (repeatable) reads the ELMER systems with those decodes only (default: all of them).
``--device cuda`` runs the whole comparison (training, distillation, generation, calibration, timing) on one
GPU in fp32; the default, ``cpu``, is what the tables in docs/quality were measured with.
With ``--average-last N`` every system is also read with the mean weights of its last N interval checkpoints
(``elmer-average-checkpoints``), next to its last checkpoint, in ``WORK/compare-avgN.{json,md}``.
A stage whose output exists is not run again, so an interrupted run resumes where it stopped (delete ``WORK/<system>`` to retrain one).
"""

import argparse
import json
import lzma
import math
import os
import re
import shutil
import subprocess
import sys
import time

from elmer_fairseq.average_checkpoints import numbered_checkpoints
from elmer_fairseq.length_calibration import KNOBS
from elmer_fairseq.model_sizes import size_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# small: the debsum README's reference size (3+3 layers, d=256, FFN 1024, 4 heads)
SIZES = {"small": size_flags(3, 256, 1024, 4), "tiny": size_flags(2, 64, 128, 2)}

AR_TRAIN = ["--task", "translation", "--arch", "transformer", "--share-all-embeddings",
            "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"]
ELMER_TRAIN = ["--user-dir", os.path.join(REPO, "elmer_fairseq"), "--task", "nat_early_exit",
               "--arch", "elmer_nat", "--criterion", "lplm", "--label-smoothing", "0.1"]

# name -> (extra fairseq-train flags, decodes {label: extra fairseq-generate flags}); "kd" in the
# name: trained on the distilled training split


def calibrated(collapse=False, neighbours=0, unit="pieces", rule="first-eos", ratio=1.0):
    """A decode whose length knob is chosen on training pairs (length_calibration.py) so that the
    output/reference ratio there is nearest ``ratio``: rule first-eos, the --eos-penalty; rule quantile,
    the --length-quantile; for generation with --collapse-repeats / --no-repeat-neighbours K, lengths
    counted in ``unit``."""
    return {"collapse": collapse, "neighbours": neighbours, "unit": unit, "rule": rule, "ratio": ratio}


def rule_flags(collapse=False, neighbours=0):
    """The repeat rules of a calibrated decode, as generation and length calibration both take them."""
    return (["--collapse-repeats"] if collapse else []) + (["--no-repeat-neighbours", str(neighbours)] if neighbours else [])


ELMER_DECODES = {
    "first </s>": ["--length-rule", "first-eos"],
    "most probable </s>": ["--length-rule", "mode"],
    "median </s>": ["--length-rule", "median"],
    "first </s>, eos penalty from train": calibrated(),
    "first </s>, eos penalty from train, repeats collapsed": calibrated(collapse=True),
    "no repeated neighbours (4 best), first </s>": ["--no-repeat-neighbours", "4"],
    "no repeated neighbours (4 best), eos penalty from train (words)": calibrated(neighbours=4, unit="words"),
    "no repeated neighbours (4 best), median </s>": ["--no-repeat-neighbours", "4", "--length-rule", "median"],
    "no repeated neighbours (4 best), length quantile from train (words)":
        calibrated(neighbours=4, unit="words", rule="quantile"),
    "no repeated neighbours (4 best), length quantile from train (words, ratio 0.95)":
        calibrated(neighbours=4, unit="words", rule="quantile", ratio=0.95),
}
# --ctc: the output is the canvas with repeats merged and blanks dropped; its length knob is a penalty
# on log p(blank)
CTC_DECODES = {
    "ctc (repeats merged, blanks dropped)": [],
    "ctc, blank penalty from train (words, ratio 0.95)": calibrated(unit="words", rule="blank-penalty", ratio=0.95),
}
# a --ctc system's canvas: the data's (the p99 of training targets + 1) times this, so that a path
# (a blank between equal neighbours, room to spare) fits the long targets too
CTC_CANVAS_FACTOR = 1.5
SYSTEMS = {
    "ar": ([], {"beam 4": ["--beam", "4"], "greedy": ["--beam", "1"]}),
    # the AR without dropout: the baseline under the students' --dropout 0 (a fairness check, not the baseline)
    "ar-d0": (["--dropout", "0"], {"beam 4": ["--beam", "4"], "greedy": ["--beam", "1"]}),
    "elmer-soft": (["--early-exit", "soft"], ELMER_DECODES),
    "elmer-soft-pad": (["--early-exit", "soft", "--post-eos", "pad"], ELMER_DECODES),
    "elmer-soft-glat": (["--early-exit", "soft", "--glat"], ELMER_DECODES),
    "elmer-soft-kd": (["--early-exit", "soft"], ELMER_DECODES),
    "elmer-soft-kd-glat": (["--early-exit", "soft", "--glat"], ELMER_DECODES),
    # the same student without dropout (the flag after the common --dropout 0.1 wins): is the
    # 1,800-update student limited by how fast it fits?
    "elmer-soft-kd-glat-d0": (["--early-exit", "soft", "--glat", "--dropout", "0"], ELMER_DECODES),
    "elmer-soft-kdmix-glat": (["--early-exit", "soft", "--glat"], ELMER_DECODES),
    "elmer-hard-kd-glat": (["--early-exit", "hard", "--glat"], ELMER_DECODES),
    "elmer-lplm-kd-glat": (["--early-exit", "lplm", "--glat"], ELMER_DECODES),
    # CTC over a longer canvas (elmer_fairseq/ctc.py): length and repeats decided by the one pass
    "elmer-soft-kd-glat-d0-ctc": (["--early-exit", "soft", "--glat", "--dropout", "0", "--ctc"], CTC_DECODES),
}
TEACHER = "ar teacher"  # the AR trained on to --teacher-updates: scored like "ar", beam 4 only
DEFAULT_SYSTEMS = "ar,elmer-soft-glat"  # the 1,800-update debsum comparison (README)


def log(msg):
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd, out=None, env=None):
    """Run a command from the repository root; its output goes to ``out`` (a log file) if given."""
    log(" ".join(cmd) if len(cmd) < 40 else " ".join(cmd[:40]) + " ...")
    if out is None:
        subprocess.run(cmd, check=True, cwd=REPO, env=env)
        return
    with open(out, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        with open(out) as f:
            tail = f.readlines()[-15:]
        raise SystemExit(f"command failed (exit {proc.returncode}), see {out}:\n" + "".join(tail))


def tool(name):
    """A console script of the interpreter's environment (fairseq-train, ...)."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else name


# ---------------------------------------------------------------- data

def read_lines(raw, name, limit=None):
    """Lines of RAW_DIR/name or RAW_DIR/name.xz (the first ``limit`` if given)."""
    path = os.path.join(raw, name)
    if os.path.exists(path):
        f = open(path, encoding="utf-8")
    elif os.path.exists(path + ".xz"):
        f = lzma.open(path + ".xz", "rt", encoding="utf-8")
    else:
        raise SystemExit(f"compare: RAW_DIR {raw} has neither {name} nor {name}.xz")
    with f:
        lines = [line.rstrip("\n") for line in f]
    return lines[:limit] if limit else lines


def find_one(raw, suffix):
    found = sorted(f for f in os.listdir(raw) if f.endswith(suffix))
    return os.path.join(raw, found[0]) if found else None


def prepare(args):
    """Raw text -> sentencepiece pieces -> fairseq-preprocess (joined dictionary) -> WORK/bin."""
    from elmer_fairseq.canvas import canvas_rule_from_targets

    bin_dir = os.path.join(args.work, "bin")
    if os.path.exists(os.path.join(bin_dir, "canvas.json")):
        return
    text = os.path.join(args.work, "text")
    os.makedirs(text, exist_ok=True)
    limits = {"train": args.train_limit, "valid": args.valid_limit}
    for split in ("train", "valid"):
        for side in ("src", "tgt"):
            lines = read_lines(args.raw, f"{split}.{side}", limits[split])
            with open(os.path.join(text, f"{split}.{side}"), "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
    model = find_one(args.raw, ".model")
    dictionary = find_one(args.raw, ".txt") if model else None
    bpe = [sys.executable, os.path.join(REPO, "scripts", "bpe.py")]
    if model is None:
        log(f"no sentencepiece model in {args.raw}: training one of {args.vocab} pieces")
        run(bpe + ["train", "--model", f"{text}/spm", "--vocab-size", str(args.vocab), f"{text}/train.src", f"{text}/train.tgt"])
        model = f"{text}/spm.model"
    run(bpe + ["encode", "--style", "sentencepiece", "--model", model]
        + [f"{text}/{split}.{side}:{text}/{split}.bpe.{side}" for split in ("train", "valid") for side in ("src", "tgt")])
    dict_flags = ["--srcdict", dictionary] if dictionary else []
    shutil.rmtree(bin_dir, ignore_errors=True)
    run([tool("fairseq-preprocess"), "--source-lang", "src", "--target-lang", "tgt",
         "--trainpref", f"{text}/train.bpe", "--validpref", f"{text}/valid.bpe", "--destdir", bin_dir,
         "--joined-dictionary", "--workers", "2", *dict_flags], out=os.path.join(args.work, "preprocess.log"))
    shutil.copy(model, os.path.join(bin_dir, "spm.model"))
    with open(os.path.join(text, "train.bpe.tgt"), encoding="utf-8") as f:
        a, b, mean = canvas_rule_from_targets(len(line.split()) for line in f)
    log(f"targets (pieces + </s>): mean {mean:.1f}, p99 {b}: canvas T = {b}")
    with open(os.path.join(bin_dir, "canvas.json"), "w") as f:
        json.dump({"canvas_len_a": a, "canvas_len_b": b, "mean_target": mean}, f)


# ---------------------------------------------------------------- training

def spec(name):
    """(training flags, decodes) of a system; the trained-on teacher is decoded with beam 4."""
    if name == TEACHER:
        return [], {"beam 4": SYSTEMS["ar"][1]["beam 4"]}
    return SYSTEMS[name]


def base_train_flags(size, max_tokens, max_update, lr=5e-4, warmup=1000, seed=1, cpu=True):
    """What every system trains with, here and in scripts/train_speed.py: size, dropout, optimizer,
    schedule, batch, updates, source truncation, no validation, the CPU (``cpu``; else fairseq's default,
    CUDA)."""
    return [*SIZES[size], "--dropout", "0.1",
            "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(lr),
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(warmup), "--clip-norm", "1.0",
            "--max-tokens", str(max_tokens), "--max-update", str(max_update),
            "--max-source-positions", "512", "--truncate-source", "--disable-validation",
            "--seed", str(seed), "--num-workers", "0", "--log-format", "simple"] + (["--cpu"] if cpu else [])


def elmer_train_flags(canvas):
    """ELMER's task, model and criterion with the data's canvas rule (canvas.json's keys)."""
    return ELMER_TRAIN + ["--canvas-len-a", str(canvas["canvas_len_a"]), "--canvas-len-b", str(canvas["canvas_len_b"])]


def cpu_flag(args):
    """``--cpu`` for the fairseq tools and length calibration under ``--device cpu``; nothing under cuda."""
    return ["--cpu"] if args.device == "cpu" else []


def schedule(args, name):
    """(learning rate, warm-up updates) of a system: --lr/--warmup for the AR systems, --student-lr/
    --student-warmup (by default the same) for the ELMER systems."""
    if is_ar(name):
        return args.lr, args.warmup
    return args.student_lr, args.student_warmup


def schedule_tag(args):
    """The suffix of the ELMER systems' folders when their schedule is not the AR's: '-lr<LR>-wu<W>'."""
    if (args.student_lr, args.student_warmup) == (args.lr, args.warmup):
        return ""
    return f"-lr{args.student_lr:g}-wu{args.student_warmup}"


def train_flags(args, name, max_update=None):
    extra, _ = SYSTEMS[name]
    with open(os.path.join(args.work, "bin", "canvas.json")) as f:
        canvas = json.load(f)
    common = base_train_flags(args.size, args.max_tokens, max_update or args.max_update, *schedule(args, name),
                              args.seed, cpu=args.device == "cpu")
    common += ["--save-interval-updates", str(args.save_every), "--keep-interval-updates", "-1",
               "--no-epoch-checkpoints", "--log-interval", str(args.save_every)]
    if is_ar(name):
        return AR_TRAIN + common + extra
    if "--glat" in extra:
        extra = extra + ["--glat-anneal-updates", str(args.max_update)]
    if "--ctc" in extra:
        canvas = ctc_canvas_rule(canvas)
    return elmer_train_flags(canvas) + common + extra


def ctc_canvas_rule(canvas):
    """The canvas rule of a --ctc system: the data's, with its length CTC_CANVAS_FACTOR times longer."""
    return dict(canvas, canvas_len_b=math.ceil(canvas["canvas_len_b"] * CTC_CANVAS_FACTOR))


def is_ar(name):
    """The fairseq transformer systems: the baseline, its variants (``ar-...``) and the trained-on teacher."""
    return name == TEACHER or name == "ar" or name.startswith("ar-")


def trained_on_tag(args):
    """'-tN' when the teacher is trained on to N = --teacher-updates beyond --max-update, else ''."""
    return "" if args.teacher_updates == args.max_update else f"-t{args.teacher_updates}"


def teacher_tag(args):
    """The suffix of the teacher's data and students' folders: '' for the teacher system 'ar' (the
    default), '-<system>' for another (--teacher-system, e.g. '-ar-d0'); then '-tN' when the teacher is
    trained on to N updates."""
    return ("" if args.teacher_system == "ar" else f"-{args.teacher_system}") + trained_on_tag(args)


def teacher_folder(args):
    """WORK/<teacher system>, or WORK/<teacher system>-tN when trained on to N updates."""
    return os.path.join(args.work, args.teacher_system + trained_on_tag(args))


def kd_tag(args):
    """The suffix of the distilled data's and the students' folders: the teacher's, and '-best-of-N' when
    the targets are the candidates of the teacher's N-best nearest the references (--kd-nbest), and
    '-lenpen-L' when the teacher's beam search ran with length penalty L (--kd-lenpen)."""
    return (teacher_tag(args) + (f"-best-of-{args.kd_nbest}" if args.kd_nbest > 1 else "")
            + (f"-lenpen-{args.kd_lenpen:g}" if args.kd_lenpen != 1 else ""))


def folder(args, name):
    """WORK/<name>, with the teacher's suffix for the kd systems and the students' schedule's
    (--student-lr/--student-warmup) for the ELMER systems; TEACHER: the teacher trained on."""
    if name == TEACHER:
        return teacher_folder(args)
    return os.path.join(args.work, name + (kd_tag(args) if "kd" in name else "")
                        + ("" if is_ar(name) else schedule_tag(args)))


def data_dir(args, name):
    if "kdmix" in name:
        return os.path.join(args.work, "bin-kdmix" + kd_tag(args))
    return os.path.join(args.work, "bin-kd" + kd_tag(args) if "kd" in name else "bin")


def train(args, name):
    save = folder(args, name)
    last = os.path.join(save, "checkpoint_last.pt")
    if os.path.exists(os.path.join(save, "done")):
        return
    shutil.rmtree(save, ignore_errors=True)
    os.makedirs(save)
    cmd = [tool("fairseq-train"), data_dir(args, name), "--save-dir", save, *train_flags(args, name)]
    t0 = time.time()
    run(cmd, out=os.path.join(save, "train.log"))
    if not os.path.exists(last):
        raise SystemExit(f"compare: training {name} wrote no {last}")
    with open(os.path.join(save, "done"), "w") as f:
        json.dump({"wall_s": time.time() - t0, "command": cmd}, f)


def train_teacher(args):
    """WORK/<system>-tN: the teacher system (--teacher-system, an AR) trained on from its last checkpoint to
    --teacher-updates (fairseq-train restores the model, optimizer, learning-rate schedule and data
    position from checkpoint_last.pt)."""
    save = teacher_folder(args)
    if os.path.exists(os.path.join(save, "done")):
        return
    shutil.rmtree(save, ignore_errors=True)
    os.makedirs(save)
    shutil.copy(os.path.join(args.work, args.teacher_system, "checkpoint_last.pt"), os.path.join(save, "checkpoint_last.pt"))
    cmd = [tool("fairseq-train"), os.path.join(args.work, "bin"), "--save-dir", save,
           *train_flags(args, args.teacher_system, max_update=args.teacher_updates),
           # --user-dir allow-lists fairseq's checkpoint types for torch.load (the resume reads one)
           "--user-dir", os.path.join(REPO, "elmer_fairseq")]
    t0 = time.time()
    run(cmd, out=os.path.join(save, "train.log"))
    with open(os.path.join(save, "done"), "w") as f:
        json.dump({"wall_s": time.time() - t0, "command": cmd}, f)


def walls(args, name):
    """{num_updates: training wall-clock seconds} from the fairseq train log."""
    out = {}
    with open(os.path.join(folder(args, name), "train.log")) as f:
        for line in f:
            m_u, m_w = re.search(r"num_updates[ =](\d+)", line), re.search(r"\bwall[ =]([\d.]+)", line)
            if m_u and m_w:
                out[int(m_u.group(1))] = float(m_w.group(1))
    return out


def distill(args):
    kd = data_dir(args, "kd")
    if os.path.exists(os.path.join(kd, "done")):
        return
    with open(os.path.join(args.work, "bin", "canvas.json")) as f:
        canvas = json.load(f)["canvas_len_b"]
    # the teacher writes at most what the student's canvas holds (longer targets would be truncated
    # in training): a looping teacher's beam search would otherwise run to 128 pieces
    env = dict(os.environ, TEACHER=os.path.join(teacher_folder(args), "checkpoint_last.pt"), OUT=kd,
               MAX_LEN_B=str(canvas), CPU="1" if args.device == "cpu" else "0",
               NBEST=str(args.kd_nbest), LENPEN=f"{args.kd_lenpen:g}",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    run(["bash", os.path.join(REPO, "scripts", "distill.sh"), os.path.join(args.work, "bin")], env=env,
        out=os.path.join(args.work, f"distill{kd_tag(args)}.log"))
    open(os.path.join(kd, "done"), "w").close()


def mix(args):
    """WORK/bin-kdmix: the distilled training pairs followed by the original ones, merged into one binarized
    ``train`` split (fairseq 0.12's ``train1`` concatenation fails with numpy 2 in ConcatDataset.sizes);
    the original valid split and dictionaries (links)."""
    from fairseq.data import indexed_dataset

    out = data_dir(args, "kdmix")
    if os.path.exists(os.path.join(out, "done")):
        return
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    bin_dir, kd = os.path.join(args.work, "bin"), data_dir(args, "kd")
    for f in os.listdir(bin_dir):
        if not f.startswith("train.") and not f.endswith(".log"):
            os.symlink(os.path.join(bin_dir, f), os.path.join(out, f))
    for side in ("src", "tgt"):
        stem = f"train.src-tgt.{side}"
        with open(os.path.join(bin_dir, f"dict.{side}.txt"), encoding="utf-8") as f:
            vocab = sum(1 for _ in f) + 4  # + fairseq's special symbols: the dtype fairseq-preprocess chose
        builder = indexed_dataset.make_builder(os.path.join(out, stem + ".bin"), impl="mmap", vocab_size=vocab)
        for part in (kd, bin_dir):
            builder.merge_file_(os.path.join(part, stem))
        builder.finalize(os.path.join(out, stem + ".idx"))
    open(os.path.join(out, "done"), "w").close()
    log(f"{out}: distilled + original training pairs")


# ---------------------------------------------------------------- generation and scores

def elmer_decodes(args, name):
    """The decode labels a system is read with: the AR's all; an ELMER system's those of --elmer-decode
    (in ELMER_DECODES' order), all if none was given; a --ctc system's all (CTC_DECODES)."""
    _, decodes = spec(name)
    if is_ar(name) or not args.elmer_decode or decodes is CTC_DECODES:
        return list(decodes)
    return [label for label in decodes if label in args.elmer_decode]


def generate(args, name, label, ckpt, tag=""):
    """fairseq-generate on valid; returns the score record (cached as JSON next to the output)."""
    from elmer_fairseq.score import parse_generate_log, score, text_shape

    _, decodes = spec(name)
    slug = re.sub(r"[^a-z0-9]+", "-", f"{label} {tag}".lower()).strip("-")
    out = os.path.join(folder(args, name), f"valid.{slug}.txt")
    if not os.path.exists(out + ".json"):
        flags, knob = decodes[label], None
        if isinstance(flags, dict):
            knob, option = calibrated_knob(args, name, ckpt, **flags), KNOBS[flags["rule"]]
            rule = [] if flags["rule"] == "blank-penalty" else ["--length-rule", flags["rule"]]
            flags = rule + [f"--{option}", str(knob)] + rule_flags(flags["collapse"], flags["neighbours"])
        cmd = [tool("fairseq-generate"), os.path.join(args.work, "bin"), "--path", ckpt, "--gen-subset", "valid",
               "--batch-size", "64", "--post-process", "sentencepiece", *cpu_flag(args),
               "--max-source-positions", "512", "--truncate-source", *flags,
               # --user-dir for every system: it also allow-lists fairseq's checkpoint types for torch.load
               "--user-dir", os.path.join(REPO, "elmer_fairseq")]
        if not is_ar(name):
            cmd += ["--task", "nat_early_exit"]
        else:  # the AR may write up to 3x the ELMER canvas (the p99 target length), never more
            with open(os.path.join(args.work, "bin", "canvas.json")) as f:
                cmd += ["--max-len-a", "0", "--max-len-b", str(3 * json.load(f)["canvas_len_b"])]
        t0 = time.time()
        run(cmd, out=out)
        wall = time.time() - t0
        with open(out, encoding="utf-8") as f:
            hyps, refs = parse_generate_log(f)
        record = {"system": name, "decode": label, "checkpoint": ckpt, "flags": flags, "generate_wall_s": wall}
        if knob is not None:
            record[option.replace("-", "_")] = knob
        for collapse in (False, True):
            s = score(hyps, refs, collapse_words=collapse)
            suffix = " (repeats removed)" if collapse else ""
            for key in ("ROUGE-1", "ROUGE-2", "ROUGE-L"):
                record[key + suffix] = s[key]
        record.update(text_shape(hyps, refs))
        with open(out + ".json", "w") as f:
            json.dump(record, f, indent=1)
    with open(out + ".json") as f:
        return json.load(f)


def calibrated_knob(args, name, ckpt, collapse=False, neighbours=0, unit="pieces", rule="first-eos", ratio=1.0):
    """The --eos-penalty (rule first-eos), --length-quantile (rule quantile) or --blank-penalty (rule
    blank-penalty, a --ctc system) whose output/reference
    length ratio on --calibration-pairs training pairs is nearest ``ratio`` (elmer_fairseq/length_calibration.py;
    cached), with ``collapse`` the length after --collapse-repeats, with ``neighbours`` the outputs of
    --no-repeat-neighbours, counted in ``unit`` (pieces or words). The valid split is not read."""
    tag = ((".collapsed" if collapse else "") + (f".k{neighbours}" if neighbours else "")
           + ("" if unit == "pieces" else f".{unit}") + ("" if rule == "first-eos" else f".{rule}")
           + ("" if ratio == 1.0 else f".ratio{ratio:g}"))
    out = os.path.join(folder(args, name), f"calibration{tag}.{os.path.basename(ckpt)}.json")
    if not os.path.exists(out):
        run([sys.executable, "-m", "elmer_fairseq.length_calibration", os.path.join(args.work, "bin"), "--path", ckpt,
             "--subset", "train", "--sentences", str(args.calibration_pairs), *cpu_flag(args), "--json", out, "--unit", unit,
             "--rule", rule, "--target-ratio", str(ratio)]
            + rule_flags(collapse, neighbours), out=out + ".log")
    with open(out) as f:
        return json.load(f)[KNOBS[rule].replace("-", "_")]


def bs1_ms(args, name, ckpt, tag=""):
    """Batch-1 median ms per sentence from scripts/benchmark.py (cached)."""
    out = os.path.join(folder(args, name), f"bs1{tag}.json")
    if not os.path.exists(out):
        flag = "--ar" if is_ar(name) else "--elmer-soft"
        cmd = [sys.executable, os.path.join(REPO, "scripts", "benchmark.py"), "--data", os.path.join(args.work, "bin"),
               "--split", "valid", flag, ckpt, "--max-sentences", str(args.bs1_sentences), "--warmup", "5",
               "--large-batch", "64", "--memory-batches", "--json", out, "--device", args.device]
        if flag == "--elmer-soft":
            cmd += ["--thresholds"]
        run(cmd, out=out + ".log")
    with open(out) as f:
        results = json.load(f)["tables"][0]["results"]
    return {r["system"]: r["ms_median_bs1"] for r in results}


def interval_checkpoint(args, name, updates):
    """WORK/<name>/checkpoint_<epoch>_<updates>.pt, or None."""
    return numbered_checkpoints(folder(args, name)).get(updates)


def averaged_checkpoint(args, name, up_to):
    """WORK/<name>/checkpoint_avg<N>[_at<U>].pt: the mean weights of the system's --average-last N interval
    checkpoints up to ``up_to`` updates (elmer_fairseq/average_checkpoints.py; cached)."""
    n = args.average_last
    out = os.path.join(folder(args, name), f"checkpoint_avg{n}" + ("" if up_to == args.max_update else f"_at{up_to}") + ".pt")
    if not os.path.exists(out):
        run([sys.executable, "-m", "elmer_fairseq.average_checkpoints", "--dir", folder(args, name),
             "--last-updates", str(n), "--up-to", str(up_to), "--output", out], out=out + ".log")
    return out


def time_matched_checkpoint(args, name, budget_s):
    """The system's last interval checkpoint saved within ``budget_s`` seconds of training."""
    wall, found = walls(args, name), numbered_checkpoints(folder(args, name))
    ok = [u for u, w in wall.items() if w <= budget_s and u % args.save_every == 0 and u in found]
    return (found[max(ok)], max(ok)) if ok else (None, 0)


# ---------------------------------------------------------------- report

COLUMNS = [("R-1", "ROUGE-1"), ("R-2", "ROUGE-2"), ("R-L", "ROUGE-L"), ("R-L rep. removed", "ROUGE-L (repeats removed)"),
           ("len ratio", "length_ratio"), ("repeat %", "repeat_rate"), ("bs1 ms", "bs1_ms"),
           ("updates", "updates"), ("train s", "train_s"), ("R-L time-matched", "time_matched_rougeL"),
           ("tm updates", "time_matched_updates")]


def markdown(rows):
    head = "| system | decode | " + " | ".join(c for c, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        cells = []
        for _, key in COLUMNS:
            v = r.get(key)
            cells.append("—" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v))
        lines.append(f"| {r['system']} | {r['decode']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("raw", help="folder with {train,valid}.{src,tgt}[.xz] (+ optional *.model, dict*.txt)")
    p.add_argument("--work", default=os.path.join(REPO, "runs", "compare"), help="where everything is written")
    p.add_argument("--systems", default=DEFAULT_SYSTEMS, help=f"comma-separated, from {', '.join(SYSTEMS)}")
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="model size of every system")
    p.add_argument("--max-update", type=int, default=1800, help="training updates of every system")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of every system (the ELMER systems: "
                   "see --student-lr)")
    p.add_argument("--warmup", type=int, default=1000, help="inverse_sqrt warm-up updates (ELMER: see --student-warmup)")
    p.add_argument("--student-lr", type=float, metavar="LR",
                   help="peak learning rate of the ELMER systems only (default --lr); the AR systems and the teacher "
                   "keep --lr, so one run compares the AR at its schedule with ELMER at its own (folders ...-lrLR-wuW)")
    p.add_argument("--student-warmup", type=int, metavar="W",
                   help="warm-up updates of the ELMER systems only (default --warmup)")
    p.add_argument("--elmer-decode", action="append", choices=list(ELMER_DECODES), metavar="LABEL",
                   help="read the ELMER systems with this decode only (repeatable; default: every decode): one of "
                   + "; ".join(f"'{label}'" for label in ELMER_DECODES))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where every system trains, distils, generates, calibrates and is timed (fp32 either way); "
                   "cpu: the tables in docs/quality; cuda: the same run on one GPU, in minutes instead of hours")
    p.add_argument("--save-every", type=int, default=100, help="interval checkpoints, for the time-matched column")
    p.add_argument("--vocab", type=int, default=8000, help="sentencepiece size when RAW_DIR brings no model")
    p.add_argument("--train-limit", type=int, help="use the first N training pairs only")
    p.add_argument("--valid-limit", type=int, help="use the first N valid pairs only")
    p.add_argument("--bs1-sentences", type=int, default=100, help="sentences timed at batch size 1 (0: skip)")
    p.add_argument("--no-time-matched", action="store_true", help="skip the time-matched column")
    p.add_argument("--calibration-pairs", type=int, default=1000,
                   help="training pairs on which the 'eos penalty from train' decoding picks its --eos-penalty")
    p.add_argument("--at-update", type=int, metavar="N",
                   help="score every system at its interval checkpoint of N updates (a multiple of --save-every) "
                   "instead of training to --max-update; systems still training are read as they are")
    p.add_argument("--teacher-updates", type=int, metavar="N",
                   help="the kd systems' teacher: the AR trained on from --max-update to N updates (default: the "
                   "AR baseline itself, N = --max-update); students still train --max-update updates")
    p.add_argument("--baseline", default="ar", choices=[n for n in SYSTEMS if is_ar(n)],
                   help="the AR system always trained and read first, whose wall-clock the time-matched column "
                   "gives the ELMER systems (ar-d0: the AR without dropout; then the dropout-0.1 AR is trained "
                   "only if --systems names it)")
    p.add_argument("--teacher-system", default="ar", choices=[n for n in SYSTEMS if is_ar(n)],
                   help="the kd systems' teacher: this AR system (trained as in --systems, then on to "
                   "--teacher-updates); other than 'ar', its name is in the data's and students' folders")
    p.add_argument("--kd-nbest", type=int, default=1, metavar="N",
                   help="the kd systems' targets: of the teacher's N best beam outputs, the one nearest the training "
                   "reference (scripts/distill.sh NBEST=N; data WORK/bin-kd...-best-of-N, students WORK/<system>...-best-of-N); "
                   "1: the teacher's best")
    p.add_argument("--average-last", type=int, default=1, metavar="N",
                   help="also score every system (the AR included; not the teacher) with the mean weights of its N last "
                   "interval checkpoints (one every --save-every updates, up to --max-update or --at-update; "
                   "elmer_fairseq/average_checkpoints.py), next to its last checkpoint; table WORK/compare[-at-U]-avgN.*; "
                   "1: the last checkpoint alone")
    p.add_argument("--kd-lenpen", type=float, default=1.0, metavar="L",
                   help="the teacher's beam-search length penalty for the kd systems' targets (fairseq-generate "
                   "--lenpen; above 1 favours longer outputs; scripts/distill.sh LENPEN=L; folders ...-lenpen-L)")
    args = p.parse_args(argv)
    if args.kd_nbest < 1:
        p.error(f"--kd-nbest {args.kd_nbest}: expected 1 or more")
    if args.average_last < 1:
        p.error(f"--average-last {args.average_last}: expected 1 or more")
    if args.kd_lenpen <= 0:
        p.error(f"--kd-lenpen {args.kd_lenpen}: expected a positive length penalty")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA device here (use --device cpu)")
    args.raw, args.work = os.path.abspath(args.raw), os.path.abspath(args.work)
    args.teacher_updates = args.teacher_updates or args.max_update
    args.student_lr = args.lr if args.student_lr is None else args.student_lr
    args.student_warmup = args.warmup if args.student_warmup is None else args.student_warmup
    if args.student_lr <= 0 or args.student_warmup < 0:
        p.error(f"--student-lr {args.student_lr} --student-warmup {args.student_warmup}: expected a positive "
                "learning rate and 0 or more warm-up updates")
    if args.teacher_updates < args.max_update:
        p.error(f"--teacher-updates {args.teacher_updates}: expected at least --max-update ({args.max_update})")
    names = [n for n in args.systems.split(",") if n]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        p.error(f"--systems: unknown {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    # the baseline first (the ar one is by default also the teacher of the kd systems)
    names = [args.baseline] + [n for n in names if n != args.baseline]
    kd = any("kd" in n for n in names)
    if kd and args.teacher_system != args.baseline:  # trained right after the baseline, before any student
        names = [names[0], args.teacher_system] + [n for n in names[1:] if n != args.teacher_system]
    trained_on = kd and args.teacher_updates != args.max_update
    if trained_on:
        names.insert(names.index(args.teacher_system) + 1, TEACHER)
    os.makedirs(args.work, exist_ok=True)

    prepare(args)
    rows = []
    if args.at_update is None:
        for name in names:  # the teacher system, then the teacher, before the kd systems
            if name == TEACHER:
                train_teacher(args)
                continue
            if "kd" in name:
                distill(args)
            if "kdmix" in name:
                mix(args)
            train(args, name)
    ar_wall = max(walls(args, args.baseline).values(), default=None)
    for name in names:
        ckpt = os.path.join(folder(args, name), "checkpoint_last.pt")
        if name == TEACHER:  # read at its last checkpoint, also with --at-update; not timed (the AR's model)
            r = generate(args, name, "beam 4", ckpt)
            r.update(system=f"{args.teacher_system}, {args.teacher_updates} updates (teacher)", updates=args.teacher_updates)
            rows.append(r)
            continue
        tag = "" if args.at_update is None else f"at {args.at_update}"
        if args.at_update is not None:
            ckpt = interval_checkpoint(args, name, args.at_update)
            if ckpt is None:
                raise SystemExit(f"compare: {name} has no checkpoint at {args.at_update} updates")
        timing = bs1_ms(args, name, ckpt, tag.replace(" ", "-")) if args.bs1_sentences else {}
        # the last checkpoint, and with --average-last N also the mean of the last N (same run, side by side)
        reads = [(ckpt, tag, "")]
        if args.average_last > 1:
            reads.append((averaged_checkpoint(args, name, args.at_update or args.max_update),
                          f"{tag} avg {args.average_last}".strip(), f", mean of the last {args.average_last} checkpoints"))
        decodes = elmer_decodes(args, name)
        wall = walls(args, name)
        for read, read_tag, suffix in reads:
            for label in decodes:
                r = generate(args, name, label, read, read_tag)
                r["system"] = os.path.basename(folder(args, name))
                r["decode"] = label + suffix
                r["updates"] = args.at_update or args.max_update
                r["averaged"] = args.average_last if suffix else 1
                r["train_s"] = wall.get(r["updates"])
                if is_ar(name):
                    r["bs1_ms"] = timing.get(f"AR {'beam 4' if label == 'beam 4' else 'greedy'} (fairseq transformer)")
                else:
                    r["bs1_ms"] = timing.get("ELMER soft")
                    if not args.no_time_matched and ar_wall is not None and args.at_update is None and not suffix:
                        # None: no checkpoint of this system was saved within the AR's wall-clock
                        tm_ckpt, tm_updates = time_matched_checkpoint(args, name, ar_wall)
                        r["time_matched_updates"], r["time_matched_rougeL"] = tm_updates, None
                        if tm_ckpt and tm_updates < args.max_update:
                            r["time_matched_rougeL"] = generate(args, name, label, tm_ckpt, f"at {tm_updates}")["ROUGE-L"]
                        elif tm_ckpt:
                            r["time_matched_rougeL"] = r["ROUGE-L"]
                rows.append(r)
    table = markdown(rows)
    print(table)
    stem = ("compare" if args.at_update is None else f"compare-at-{args.at_update}") + (
        "" if args.average_last == 1 else f"-avg{args.average_last}")
    with open(os.path.join(args.work, stem + ".json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    with open(os.path.join(args.work, stem + ".md"), "w") as f:
        f.write(table + "\n")
    return rows


if __name__ == "__main__":
    main()
