import os
import subprocess
import sys

import pytest
import torch
from fairseq.data import Dictionary

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import elmer_fairseq  # noqa: E402,F401  (registers everything)
from elmer_fairseq.elmer_nat_model import ElmerNATConfig, ElmerNATModel  # noqa: E402
from elmer_fairseq.nat_early_exit_task import NATEarlyExitConfig, NATEarlyExitTask  # noqa: E402

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


@pytest.fixture
def task():
    return make_task()
