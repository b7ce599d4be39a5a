"""Helpers shared by the tests: tiny dictionaries, tasks, models and batches; running fairseq's CLIs."""

import os
import subprocess
import sys

import torch
from fairseq.data import Dictionary

import elmer_fairseq  # noqa: F401  (registers everything)
from elmer_fairseq.elmer_nat_model import ElmerNATConfig, ElmerNATModel
from elmer_fairseq.nat_early_exit_task import NATEarlyExitConfig, NATEarlyExitTask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the a cat dog sat ran on mat under tree big small red blue fast slow".split()


def make_dictionary(words=WORDS):
    d = Dictionary()
    for w in words:
        d.add_symbol(w)
    return d


def make_task(words=WORDS):
    d = make_dictionary(words)
    return NATEarlyExitTask(NATEarlyExitConfig(), d, d)


def make_model(task, seed=0, **overrides):
    """A tiny elmer_nat in eval mode (no dropout) unless the caller trains it."""
    torch.manual_seed(seed)
    params = dict(
        encoder_embed_dim=16,
        encoder_ffn_embed_dim=32,
        encoder_layers=2,
        encoder_attention_heads=2,
        decoder_embed_dim=16,
        decoder_ffn_embed_dim=32,
        decoder_layers=4,
        decoder_attention_heads=2,
        dropout=0.0,
        attention_dropout=0.0,
        canvas_len_a=1.0,
        canvas_len_b=2,
        max_source_positions=64,
        max_target_positions=64,
    )
    params.update(overrides)
    cfg = ElmerNATConfig(**params)
    model = ElmerNATModel.build_model(cfg, task)
    return model.eval()


def encode(task, lines):
    """Right-padded (B, S) token batch, each line + </s>, and lengths."""
    d = task.source_dictionary
    rows = [[d.index(w) for w in line.split()] + [d.eos()] for line in lines]
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), d.pad(), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    return tokens, torch.tensor([len(r) for r in rows])


def make_sample(task, sources, targets):
    src, src_len = encode(task, sources)
    tgt, _ = encode(task, targets)
    return {
        "net_input": {"src_tokens": src, "src_lengths": src_len},
        "target": tgt,
        "ntokens": int(tgt.ne(task.target_dictionary.pad()).sum()),
        "id": torch.arange(len(sources)),
    }


def write_payload_checkpoint(path, marker):
    """A checkpoint whose unpickling would run ``touch marker`` (written by a separate process)."""
    code = (
        "import os, torch\n"
        "class P:\n"
        f"    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
        f"torch.save({{'model': {{}}, 'cfg': None, 'x': P()}}, '{path}')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


TRAIN_FLAGS = [
    "--user-dir", os.path.join(REPO, "elmer_fairseq"),
    "--task", "nat_early_exit", "--arch", "elmer_nat_tiny", "--criterion", "lplm",
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-layers", "2", "--decoder-layers", "3",
    "--canvas-len-a", "0.5", "--canvas-len-b", "4",
    "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "512",
    "--cpu", "--num-workers", "0", "--seed", "1", "--log-format", "simple", "--log-interval", "1",
    "--no-epoch-checkpoints",
]


def run(module, args, **kw):
    proc = subprocess.run(
        [sys.executable, "-m", module] + args, capture_output=True, text=True, cwd=REPO, **kw
    )
    return proc


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def generate_args(dest, ckpt, *extra):
    return [
        str(dest), "--user-dir", os.path.join(REPO, "elmer_fairseq"), "--task", "nat_early_exit",
        "--path", str(ckpt), "--gen-subset", "test", "--cpu", "--batch-size", "4", *extra,
    ]
