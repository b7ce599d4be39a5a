"""Pre-training data (elmer_denoising) and the recipe from raw text to a checkpoint that fine-tunes."""

import os
import re
import subprocess

import pytest
import torch
from fairseq.data import Dictionary

from helpers import REPO
from elmer_fairseq.elmer_denoising_task import (
    ElmerDenoisingConfig,
    ElmerDenoisingDataset,
    ElmerDenoisingTask,
    word_and_sentence_tables,
)
from helpers import TRAIN_FLAGS, ok, run


def spm_dictionary():
    d = Dictionary()
    for s in ["\u2581The", "\u2581cat", "\u2581sat", ".", "\u2581It", "\u2581ran", "!", "s?", "ing", "\u2581e.g."]:
        d.add_symbol(s)
    d.add_symbol("<mask>")
    return d


def test_word_and_sentence_tables_sentencepiece():
    d = spm_dictionary()
    word_start, sentence_end = word_and_sentence_tables(d, "sentencepiece")
    ends = {d[i] for i in range(len(d)) if sentence_end[i]}
    starts = {d[i] for i in range(d.nspecial, len(d)) if word_start[i]}
    assert ends == {".", "!", "s?", "\u2581e.g."}
    assert starts == {"\u2581The", "\u2581cat", "\u2581sat", "\u2581It", "\u2581ran", "\u2581e.g.", "<mask>"}
    assert word_start[: d.nspecial].all() and not sentence_end[: d.nspecial].any()


def test_word_and_sentence_tables_gpt2(tmp_path):
    d = Dictionary()
    for s in ["262", "3797", "13", "0", "30", "5"]:  # " the", " cat", ".", "!", "?", "&"
        d.add_symbol(s)
    d.add_symbol("<mask>")
    word_start, sentence_end = word_and_sentence_tables(d, "gpt2")  # no encoder.json: ids 13, 0, 30
    assert word_start is None
    assert [d[i] for i in range(len(d)) if sentence_end[i]] == ["13", "0", "30"]
    (tmp_path / "encoder.json").write_text(
        '{"\u0120the": 262, "\u0120cat": 3797, ".": 13, "!": 0, "?": 30, "&": 5}', encoding="utf-8"
    )
    word_start, sentence_end = word_and_sentence_tables(d, "gpt2", str(tmp_path / "encoder.json"))
    assert [d[i] for i in range(d.nspecial, len(d)) if word_start[i]] == ["262", "3797", "<mask>"]
    assert [d[i] for i in range(len(d)) if sentence_end[i]] == ["13", "0", "30"]


def sentences(tokens, ends):
    """Naive reference: split a token list into sentences after each run of sentence ends."""
    out, cur = [], []
    for i, t in enumerate(tokens):
        cur.append(t)
        if ends[t] and (i + 1 == len(tokens) or not ends[tokens[i + 1]]):
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def test_permute_sentences_keeps_every_sentence_whole():
    d = spm_dictionary()
    _, sentence_end = word_and_sentence_tables(d, "sentencepiece")
    ds = ElmerDenoisingDataset.__new__(ElmerDenoisingDataset)
    ds.sentence_end = sentence_end
    words = ["\u2581The", "\u2581cat", "\u2581sat", ".", "\u2581It", "\u2581ran", "!", "!", "\u2581It", "ing", "s?",
             "\u2581The", "\u2581cat", "."]
    body = [d.index(w) for w in words]
    source = torch.tensor([d.bos()] + body + [d.eos()])
    expected = sorted(map(tuple, sentences(body, sentence_end.tolist())))
    assert len(expected) == 4
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = ds.permute_sentences(source.clone(), 1.0)
        assert out[0] == d.bos() and out[-1] == d.eos() and len(out) == len(source)
        got = sentences(out[1:-1].tolist(), sentence_end.tolist())
        assert sorted(map(tuple, got)) == expected
        seen.add(tuple(out.tolist()))
    assert len(seen) > 5  # it does shuffle
    torch.manual_seed(0)
    assert torch.equal(ds.permute_sentences(source.clone(), 0.0), source)


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory):
    """Monolingual text (the sample's docstrings, a sentence per line) binarized --only-source."""
    tmp = tmp_path_factory.mktemp("pretrain")
    raw = tmp / "raw"
    raw.mkdir()
    with open(os.path.join(REPO, "data-bin", "sample-raw", "train.src"), encoding="utf-8") as f:
        docs = [next(f).strip() for _ in range(300)]
    for name, part in (("train.txt", docs[:270]), ("valid.txt", docs[270:])):
        text = "\n\n".join("\n".join(re.split(r"(?<=[.!?])\s+", doc)) for doc in part)
        (raw / name).write_text(text + "\n", encoding="utf-8")
    return tmp, raw


@pytest.fixture(scope="module")
def pretrain_bin(pretrain_data):
    tmp, raw = pretrain_data
    dest = tmp / "bin"
    ok(run("fairseq_cli.preprocess", ["--only-source", "--trainpref", str(raw / "train.txt"),
                                      "--validpref", str(raw / "valid.txt"), "--destdir", str(dest), "--workers", "1"]))
    return dest


def denoising_task(dest, **kw):
    return ElmerDenoisingTask.setup_task(ElmerDenoisingConfig(
        data=str(dest), tokens_per_sample=64, bpe_style="none", dataset_impl="mmap", seed=1, **kw
    ))


def align_spans(source, target, mask):
    """Naive reference: source = target with each masked span (a run of >= 0 target tokens) replaced by
    one <mask>; returns the span lengths (one per <mask>), or None when no such alignment exists.
    Dynamic programming over (source prefix, target prefix), then one alignment traced back."""
    n, m = len(source), len(target)
    ok_ = [[False] * (m + 1) for _ in range(n + 1)]
    ok_[0][0] = True
    for i in range(1, n + 1):
        for j in range(m + 1):
            if source[i - 1] == mask:
                ok_[i][j] = any(ok_[i - 1][k] for k in range(j + 1))
            else:
                ok_[i][j] = j > 0 and target[j - 1] == source[i - 1] and ok_[i - 1][j - 1]
    if not ok_[n][m]:
        return None
    spans, i, j = [], n, m
    while i > 0:
        if source[i - 1] == mask:
            k = max(k for k in range(j + 1) if ok_[i - 1][k])  # the shortest span ending at j
            spans.append(j - k)
            i, j = i - 1, k
        else:
            i, j = i - 1, j - 1
    return spans[::-1]


def segment(tokens, pieces):
    """Naive reference: an order of ``pieces`` (each used once) whose concatenation is ``tokens``,
    or None (backtracking)."""
    if not pieces:
        return [] if not tokens else None
    for k, piece in enumerate(pieces):
        if tokens[: len(piece)] == piece:
            rest = segment(tokens[len(piece):], pieces[:k] + pieces[k + 1:])
            if rest is not None:
                return [k] + rest
    return None


def test_denoising_statistics(pretrain_bin):
    """Text infilling as §4.2 says: without shuffling, every source is its target with spans replaced
    by one <mask> each; about 15% of the tokens are masked, in spans of mean length about 3 (Poisson);
    and with shuffling (mask 0), the dataset reorders whole sentences."""
    task = denoising_task(pretrain_bin, permute_sentences=0.0)
    task.load_dataset("train")
    ds, mask = task.datasets["train"], task.mask_idx
    spans, total = [], 0
    for i in range(len(ds)):
        src, tgt = ds[i]["source"][:-1].tolist(), ds[i]["target"][:-1].tolist()  # </s> kept at the end
        found = align_spans(src, tgt, mask)
        assert found is not None, (src, tgt)
        spans += found
        total += len(tgt)
    masked = sum(spans)
    assert 0.12 < masked / total < 0.18, masked / total
    nonzero = [s for s in spans if s > 0]
    # Poisson(3) lengths, given a span is not empty: mean 3 / (1 - e^-3) = 3.16
    assert 2.5 < sum(nonzero) / len(nonzero) < 3.8, sum(nonzero) / len(nonzero)
    assert len(spans) > 50  # enough spans for the statistics to mean something

    task = denoising_task(pretrain_bin, permute_sentences=1.0, mask=0.0)
    task.load_dataset("train")
    ds = task.datasets["train"]
    ends = task.sentence_end.tolist()
    reordered = multi = 0
    for i in range(len(ds)):
        src, tgt = ds[i]["source"][:-1].tolist(), ds[i]["target"][:-1].tolist()
        want = sentences(tgt, ends)  # the last one ends at </s>, with or without a full stop
        order = segment(src, want)
        assert order is not None, (src, tgt)  # the source is the target's whole sentences, reordered
        if len(set(map(tuple, want))) > 1:  # two different sentences: an order to change
            multi += 1
            reordered += src != tgt
    assert multi > 20 and reordered > multi // 2, (reordered, multi)


def test_denoising_items(pretrain_bin):
    dest = pretrain_bin
    task = denoising_task(dest)
    task.load_dataset("train")
    ds = task.datasets["train"]
    d = task.dictionary
    masked = total = 0
    for i in range(len(ds)):
        item = ds[i]
        src, tgt = item["source"], item["target"]
        assert src[0] != d.bos() and tgt[0] != d.bos()  # no <s>: pairs look like fine-tuning pairs
        assert src[-1] == d.eos() and tgt[-1] == d.eos()
        assert torch.equal(ds[i]["source"], src)  # the noise of (seed, epoch, index) is fixed
        masked += int((src == task.mask_idx).sum())
        total += len(tgt) - 1
        # every source token that is not <mask> comes from the target (infilling + shuffling only)
        assert set(src[src != task.mask_idx].tolist()) <= set(tgt.tolist())
    # 15% of the tokens in Poisson(3) spans, one <mask> per span: about 0.15 / 3 masks per token
    assert 0.02 < masked / total < 0.09, masked / total
    first = [ds[i]["source"] for i in range(5)]
    ds.set_epoch(2)  # a new epoch draws new noise for the same blocks
    assert any(not torch.equal(ds[i]["source"], first[i]) for i in range(5))
    assert all(torch.equal(ds[i]["target"], ds[i]["target"]) for i in range(5))
    batch = ds.collater([ds[0], ds[1], ds[2]])
    assert batch["nsentences"] == 3 and "prev_output_tokens" not in batch["net_input"]
    with pytest.raises(FileNotFoundError, match="test: no .*fairseq-preprocess --only-source"):
        task.load_dataset("test")


def test_pretrain_recipe_then_fine_tune(pretrain_data, data_bin):
    tmp, raw = pretrain_data
    env = dict(os.environ, MAX_UPDATE="3", VOCAB="600", NGPU="0", DATA_ROOT=str(tmp / "data"),
               SAVE_DIR=str(tmp / "ckpt"), EXTRA_TRAIN_FLAGS="--encoder-layers 2 --decoder-layers 2 --batch-size 4")
    out = subprocess.run(["bash", "scripts/pretrain.sh", "--tiny", str(raw), "pt"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = (tmp / "ckpt" / "train.log").read_text()
    assert "task: ElmerDenoisingTask" in log and "num_updates 3" in log
    assert "'lplm_samples': 2" in log or "lplm_samples=2" in log
    ckpt = tmp / "ckpt" / "checkpoint_last.pt"
    assert ckpt.exists() and (tmp / "ckpt" / "dict.txt").exists() and (tmp / "ckpt" / "spm.model").exists()

    # fine-tune it through the core recipe: pair data binarized with the pre-training dictionary
    pairs, _ = data_bin
    ft_bin = tmp / "ft-bin"
    ok(run("fairseq_cli.preprocess", [
        "--source-lang", "src", "--target-lang", "tgt", "--trainpref", str(pairs / "train"),
        "--validpref", str(pairs / "valid"), "--destdir", str(ft_bin), "--joined-dictionary",
        "--srcdict", str(tmp / "ckpt" / "dict.txt"), "--workers", "1",
    ]))
    flags = [f for f in TRAIN_FLAGS]
    for size_flag in ("--encoder-embed-dim", "--decoder-embed-dim", "--encoder-ffn-embed-dim",
                      "--decoder-ffn-embed-dim", "--encoder-layers", "--decoder-layers"):
        i = flags.index(size_flag)
        del flags[i:i + 2]
    out = ok(run("fairseq_cli.train", [str(ft_bin)] + flags + [
        "--encoder-layers", "2", "--decoder-layers", "2", "--max-update", "2",
        "--finetune-from-model", str(ckpt), "--save-dir", str(tmp / "ft"),
    ]))
    assert "loaded checkpoint" in out.lower() and str(ckpt) in out
    assert re.search(r"\| valid \|.*\| loss [0-9.]+", out)
