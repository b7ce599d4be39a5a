"""Dataset recipes on small fixtures in each dataset's released format, end to end:
prepare -> fairseq-preprocess -> a few training updates -> fairseq-generate -> elmer-score."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
from prepare_dataset import parlai_dialogues, parse_summary_file, prepare  # noqa: E402

COUNTS = {"train": 40, "valid": 6, "test": 6}


def sample_pairs(n, offset=0):
    """(document, summary) pairs from the bundled corpus, short enough for a tiny model."""
    raw = os.path.join(REPO, "data-bin", "sample-raw")
    with open(os.path.join(raw, "train.src"), encoding="utf-8") as s, open(os.path.join(raw, "train.tgt"), encoding="utf-8") as t:
        pairs = [(" ".join(a.split()[:40]), b.strip()) for a, b in zip(s, t)]
    return pairs[offset : offset + n]


def write_xsum_official(root):
    ids, offset = {}, 0
    os.makedirs(root / "bbc-summary-data")
    for split, key in (("train", "train"), ("valid", "validation"), ("test", "test")):
        ids[key] = []
        for i, (doc, summary) in enumerate(sample_pairs(COUNTS[split], offset)):
            doc_id = f"{3000000 + offset + i}"
            ids[key].append(doc_id)
            (root / "bbc-summary-data" / f"{doc_id}.summary").write_text(
                f"[SN]URL[SN]\nhttp://www.bbc.co.uk/news/{doc_id}\n\n[SN]TITLE[SN]\nA title\n\n"
                f"[SN]FIRST-SENTENCE[SN]\n{summary}\n\n[SN]RESTBODY[SN]\n{doc}\nSecond line of the body.\n",
                encoding="utf-8")
        offset += COUNTS[split]
    ids["test"].append("999")  # listed in the split file, no .summary: counted and skipped
    (root / "XSum-TRAINING-DEV-TEST-SPLIT-90-5-5.json").write_text(json.dumps(ids))


def write_squad_json(root):
    def articles(pairs):
        return {"version": "1.1", "data": [
            {"title": f"t{i}", "paragraphs": [{"context": doc, "qas": [
                {"id": str(i), "question": summary, "answers": [{"text": doc.split()[0], "answer_start": 0}]}]}]}
            for i, (doc, summary) in enumerate(pairs)]}
    (root / "train-v1.1.json").write_text(json.dumps(articles(sample_pairs(50))))
    (root / "dev-v1.1.json").write_text(json.dumps(articles(sample_pairs(6, 60))))


def write_parlai(root):
    def dialogues(pairs, n_dialogues):
        lines = []
        per = len(pairs) // n_dialogues
        for d in range(n_dialogues):
            chunk = pairs[d * per : (d + 1) * per]
            lines += ["1 your persona: i like python.", "2 your persona: i read docs."]
            for k, (doc, summary) in enumerate(chunk):
                lines.append(f"{k + 3} {doc}\t{summary}\t\tcandidate one|{summary}")
        return "\n".join(lines) + "\n"
    (root / "train_self_original.txt").write_text(dialogues(sample_pairs(40), 8), encoding="utf-8")
    (root / "valid_self_original.txt").write_text(dialogues(sample_pairs(12, 50), 4), encoding="utf-8")


def test_parlai_format_to_pairs(tmp_path):
    (tmp_path / "train_self_original.txt").write_text(
        "1 your persona: i like cats.\n2 your persona: i am tall.\n3 hi there\thello !\t\ta|b\n"
        "4 how are you ?\tfine .\t\ta|b\n1 your persona: i swim.\n2 yo\tsup\t\tc\n", encoding="utf-8")
    (tmp_path / "valid_self_original.txt").write_text(
        "1 your persona: x.\n2 a\tb\t\tc\n1 your persona: y.\n2 d\te\t\tf\n", encoding="utf-8")
    assert parlai_dialogues(tmp_path / "train_self_original.txt")[0] == (
        ["i like cats.", "i am tall."], [("hi there", "hello !"), ("how are you ?", "fine .")])
    prepare("personachat", str(tmp_path), str(tmp_path / "out"))
    src = (tmp_path / "out" / "train.src").read_text().splitlines()
    tgt = (tmp_path / "out" / "train.tgt").read_text().splitlines()
    assert src == ["i like cats. i am tall. [SEP] hi there",
                   "i like cats. i am tall. [SEP] hi there [SEP] hello ! [SEP] how are you ?",
                   "i swim. [SEP] yo"]
    assert tgt == ["hello !", "fine .", "sup"]
    # no test file: valid's second half of dialogues is the test split
    assert (tmp_path / "out" / "test.tgt").read_text() == "e\n"


def test_xsum_summary_file_and_missing_layout(tmp_path):
    write_xsum_official(tmp_path)
    sections = parse_summary_file(next((tmp_path / "bbc-summary-data").iterdir()))
    assert set(sections) == {"URL", "TITLE", "FIRST-SENTENCE", "RESTBODY"}
    assert prepare("xsum", str(tmp_path), str(tmp_path / "out")) == (40, 6, 6)
    with pytest.raises(FileNotFoundError, match="none of the layouts"):
        prepare("squad_qg", str(tmp_path), str(tmp_path / "out2"))
    out = subprocess.run([sys.executable, "scripts/prepare_dataset.py", "xsum", str(tmp_path / "nope"), "x"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0 and "not a folder" in out.stderr


def test_glge_layout(tmp_path):
    for split, name in (("train", "train"), ("valid", "dev"), ("test", "test")):
        pairs = sample_pairs(3)
        (tmp_path / f"{name}.src").write_text("".join(f"{d}\n" for d, _ in pairs))
        (tmp_path / f"{name}.tgt").write_text("".join(f"{s}\n" for _, s in pairs))
    assert prepare("squad_qg", str(tmp_path), str(tmp_path / "out")) == (3, 3, 3)
    (tmp_path / "dev.tgt").write_text("one line\n")
    with pytest.raises(ValueError, match="dev.src has 3 lines but .*dev.tgt has 1"):
        prepare("squad_qg", str(tmp_path), str(tmp_path / "out"))


TINY = ("--encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 32 --decoder-embed-dim 32 "
        "--encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 --encoder-attention-heads 2 "
        "--decoder-attention-heads 2 --lr 1e-3")
COLUMNS = {"xsum": ["ROUGE-1", "ROUGE-2", "ROUGE-L"], "squad_qg": ["ROUGE-L", "BLEU-4", "METEOR n/a"],
           "personachat": ["BLEU-1", "BLEU-2", "Distinct-1", "Distinct-2", "Overall"]}
WRITERS = {"xsum": write_xsum_official, "squad_qg": write_squad_json, "personachat": write_parlai}


@pytest.mark.parametrize("dataset", sorted(WRITERS))
def test_recipe_end_to_end(dataset, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    WRITERS[dataset](raw)
    env = dict(os.environ, CPU="1", VOCAB="200", ARCH="elmer_nat_tiny", MAX_UPDATE="4", MAX_EPOCH="2",
               BATCH="8", DATA_ROOT=str(tmp_path / "data-bin"), SAVE_DIR=str(tmp_path / "ckpt"),
               EXTRA_TRAIN_FLAGS=TINY, WORKERS="1", LOG_INTERVAL="1")
    env.pop("GPT2_BPE_DIR", None)
    # the defaults (GLAT, CTC with the blank penalty calibrated on train) on squad_qg; xsum and personachat:
    # the plain first </s> with repeats collapsed, without CTC
    quality = dataset == "squad_qg"
    # squad_qg: two whole epochs (45 pairs, batch 8), so that there are epoch checkpoints to average
    env.update({"CALIBRATION_PAIRS": "20", "MAX_UPDATE": "0"} if quality else {"GLAT": "0", "CTC": "0", "LENGTH_RULE": "first-eos", "EOS_PENALTY": "0",
                                                             "NEIGHBOURS": "0", "COLLAPSE": "1", "AVERAGE_LAST": "1"})
    for name in ("GLAT", "CTC", "CTC_CANVAS", "BLANK_PENALTY", "LENGTH_RULE", "LENGTH_QUANTILE", "EOS_PENALTY",
                 "TARGET_RATIO", "COLLAPSE", "NEIGHBOURS", "AVERAGE_LAST") if quality else ():
        env.pop(name, None)
    out = subprocess.run(["bash", f"scripts/{dataset}.sh", "all", str(raw)], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    if quality:
        chosen = json.loads((tmp_path / "ckpt" / "length-calibration.json").read_text())
        assert chosen["subset"] == "train" and not chosen["collapse_repeats"]
        assert chosen["no_repeat_neighbours"] == 0 and chosen["unit"] == "words"  # a sentencepiece vocabulary
        assert chosen["rule"] == "blank-penalty" and chosen["target_ratio"] == 0.95
        assert f"--blank-penalty {chosen['blank_penalty']} (chosen on training pairs" in out.stdout
        flags = (tmp_path / "ckpt" / "generate-test.err").read_text()  # fairseq-generate logs its configuration
        assert "'length_rule': 'first-eos'" in flags and f"'blank_penalty': {chosen['blank_penalty']}" in flags
        train_log = (tmp_path / "ckpt" / "train.log").read_text()
        canvas_b = int(re.search(r"CANVAS_B=(\d+)", (tmp_path / "data-bin" / dataset / "canvas.env").read_text())[1])
        assert "glat_ratio" in train_log and "'ctc': True" in train_log
        assert f"'canvas_len_b': {math.ceil(1.5 * canvas_b)}" in train_log
        # AVERAGE_LAST=5 by default: the run has fewer epoch checkpoints, says so and averages those
        epochs = sorted(p.name for p in (tmp_path / "ckpt").glob("checkpoint[0-9]*.pt"))
        assert epochs == ["checkpoint1.pt", "checkpoint2.pt"] and f"holds {len(epochs)} checkpoint<epoch>.pt; averaging those" in out.stdout
        averaged = torch.load(tmp_path / "ckpt" / "checkpoint_avg.pt", weights_only=True)["averaged_from"]
        assert sorted(os.path.basename(p) for p in averaged) == epochs
        assert f"'path': '{tmp_path / 'ckpt' / 'checkpoint_avg.pt'}'" in flags and chosen["checkpoint"].endswith("checkpoint_avg.pt")
        # as many epoch checkpoints as AVERAGE_LAST: averaged without a word about fewer (generate again)
        env["AVERAGE_LAST"] = "2"
        again = subprocess.run(["bash", f"scripts/{dataset}.sh", "generate", str(raw)], cwd=REPO, env=env,
                               capture_output=True, text=True)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert "AVERAGE_LAST:" not in again.stdout and "(at most 2)" in again.stdout
        averaged = torch.load(tmp_path / "ckpt" / "checkpoint_avg.pt", weights_only=True)["averaged_from"]
        assert sorted(os.path.basename(p) for p in averaged) == epochs
    else:
        assert not (tmp_path / "ckpt" / "checkpoint_avg.pt").exists()
    canvas = (tmp_path / "data-bin" / dataset / "canvas.env").read_text()
    assert re.search(r"CANVAS_A=0\nCANVAS_B=\d+", canvas)
    log = (tmp_path / "ckpt" / "train.log").read_text()
    assert re.search(r"\| valid \|.*\| rougeL [0-9.]+", log), log[-2000:]
    gen = (tmp_path / "ckpt" / "generate-test.txt").read_text()
    n_test = len((tmp_path / "data-bin" / f"{dataset}.text" / "test.tgt").read_text().splitlines())
    assert len(re.findall(r"^D-\d+\t", gen, re.M)) == n_test
    scores = (tmp_path / "ckpt" / "score-test.txt").read_text()
    for column in COLUMNS[dataset]:
        assert column in scores, scores
    assert f"sentences {n_test}" in scores


def write_tiny_gpt2_bpe(folder):
    """A tiny byte-level GPT-2 BPE in the released file formats: encoder.json (the 256 byte symbols and
    three merges), vocab.bpe, and a fairseq dict.txt over all its ids (as BART's lists GPT-2 ids)."""
    from fairseq.data.encoders.gpt2_bpe_utils import bytes_to_unicode

    folder.mkdir()
    symbols = list(bytes_to_unicode().values())
    merges = [("\u0120", "t"), ("h", "e"), ("\u0120t", "he")]
    vocab = {sym: i for i, sym in enumerate(symbols)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    (folder / "encoder.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (folder / "dict.txt").write_text("".join(f"{i} {1000 - i % 7}\n" for i in range(len(vocab))), encoding="utf-8")


def test_gpt2_bpe_round_trip(tmp_path):
    write_tiny_gpt2_bpe(tmp_path / "gpt2")
    text = "the theme of the day: caf\u00e9 ok."
    (tmp_path / "in.txt").write_text(text + "\n\n", encoding="utf-8")
    flags = ["--encoder-json", str(tmp_path / "gpt2" / "encoder.json"), "--vocab-bpe", str(tmp_path / "gpt2" / "vocab.bpe")]
    for args in (["encode", "--style", "gpt2", *flags, f"{tmp_path / 'in.txt'}:{tmp_path / 'ids.txt'}"],
                 ["decode", "--style", "gpt2", *flags, f"{tmp_path / 'ids.txt'}:{tmp_path / 'out.txt'}"]):
        out = subprocess.run([sys.executable, "scripts/bpe.py", *args], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
    ids = (tmp_path / "ids.txt").read_text().splitlines()
    assert "258" in ids[0].split() and ids[1] == ""  # " the" merged into one symbol; blank line kept
    assert (tmp_path / "out.txt").read_text().splitlines() == [text, ""]


def test_recipe_with_gpt2_bpe_and_a_bart_dictionary(tmp_path):
    """The GPT2_BPE_DIR route (the one for BART-base / released ELMER weights) through all stages."""
    raw = tmp_path / "raw"
    raw.mkdir()
    write_xsum_official(raw)
    write_tiny_gpt2_bpe(tmp_path / "gpt2")
    env = dict(os.environ, CPU="1", ARCH="elmer_nat_tiny", MAX_UPDATE="3", MAX_EPOCH="1", BATCH="8",
               DATA_ROOT=str(tmp_path / "data-bin"), SAVE_DIR=str(tmp_path / "ckpt"), EXTRA_TRAIN_FLAGS=TINY,
               WORKERS="1", GPT2_BPE_DIR=str(tmp_path / "gpt2"))
    out = subprocess.run(["bash", "scripts/xsum.sh", "all", str(raw)], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "data-bin" / "xsum" / "bpe").read_text().strip() == "gpt2"
    # the binarized dictionary is BART's (here: the tiny one), in its order
    assert (tmp_path / "data-bin" / "xsum" / "dict.src.txt").read_text() == (tmp_path / "gpt2" / "dict.txt").read_text()
    gen = (tmp_path / "ckpt" / "generate-test.txt").read_text()
    targets = re.findall(r"^T-\d+\t(.*)$", gen, re.M)
    assert len(targets) == 6 and all(not re.fullmatch(r"[\d ]+", t) for t in targets)  # decoded text, not ids
    assert "ROUGE-L" in (tmp_path / "ckpt" / "score-test.txt").read_text()
