"""elmer-init-from-bart and elmer-convert-hf (elmer_fairseq/convert_bart.py, convert_hf.py) on tiny checkpoints."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.models import ARCH_CONFIG_REGISTRY
from fairseq.models.bart import BARTModel

from helpers import REPO, encode, make_task

WORDS = [f"w{i}" for i in range(40)]
TINY_BART = dict(
    encoder_layers=2, decoder_layers=3, encoder_embed_dim=16, decoder_embed_dim=16,
    encoder_ffn_embed_dim=32, decoder_ffn_embed_dim=32, encoder_attention_heads=2,
    decoder_attention_heads=2, max_source_positions=64, max_target_positions=64,
)
SOURCES = ["w1 w2 w3 w4 w5", "w7 w8"]


def save_fairseq_checkpoint(args, model, path):
    """The layout of fairseq 0.12 checkpoints such as bart.base/model.pt."""
    history = [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam",
                "lr_scheduler_state": {"best": None}, "num_updates": 0}]
    torch.save({"args": args, "model": model.state_dict(), "optimizer_history": history,
                "extra_state": {}, "last_optimizer_state": None}, path)


def tiny_bart(task):
    args = argparse.Namespace(**TINY_BART)
    ARCH_CONFIG_REGISTRY["bart_base"](args)
    args.arch = "bart_base"
    torch.manual_seed(0)
    return args, BARTModel.build_model(args, task).eval()


def console(name):
    """A console script installed beside this interpreter (setup.py entry_points)."""
    return os.path.join(os.path.dirname(sys.executable), name)


def run_script(name, *args):
    out = subprocess.run([console(name), *args],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def load_elmer(out_dir):
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [os.path.join(out_dir, "model.pt")], arg_overrides={"data": str(out_dir)}
    )
    return models[0].eval(), task


def test_init_from_bart(tmp_path):
    task = make_task(WORDS)  # adds <mask>, like BART's task
    args, bart = tiny_bart(task)
    with torch.no_grad():  # non-trivial layer norms, so a swapped tensor would show
        for name, p in bart.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    bart_dir = tmp_path / "bart"
    bart_dir.mkdir()
    save_fairseq_checkpoint(args, bart, bart_dir / "model.pt")
    plain = make_task(WORDS).source_dictionary
    plain.symbols.pop(), plain.count.pop(), plain.indices.pop("<mask>")  # BART's dict.txt has no <mask>
    plain.save(str(bart_dir / "dict.txt"))

    out = tmp_path / "elmer"
    run_script("elmer-init-from-bart", str(bart_dir / "model.pt"), str(out))
    elmer, elmer_task = load_elmer(out)
    assert len(elmer_task.source_dictionary) == len(task.source_dictionary)

    ours = elmer.state_dict()
    for name, tensor in bart.state_dict().items():
        if name == "decoder.output_projection.weight":
            assert torch.equal(ours["decoder.off_ramps.0.weight"], tensor)
        elif not name.endswith(".version"):
            assert torch.equal(ours[name], tensor), name
    assert elmer.num_exit_layers == 3 and len(elmer.encoder.layers) == 2

    src, src_len = encode(task, SOURCES)
    with torch.no_grad():
        theirs = bart.encoder(src, src_lengths=src_len)["encoder_out"][0]
        mine = elmer.encoder(src, src_lengths=src_len)
        assert torch.equal(mine["encoder_out"][0], theirs)
        # the decoder: BART's with its causal mask lifted (full_context_alignment) is ELMER's last layer
        canvas = elmer.initialize_canvas(src_len)
        ref, _ = bart.decoder(canvas, encoder_out=mine, full_context_alignment=True)
        states, _ = elmer(src, src_len, canvas)
        logits = elmer.decoder.off_ramp(states, elmer.num_exit_layers)
        keep = canvas.ne(task.target_dictionary.pad())
        assert torch.allclose(logits[keep], ref[keep], atol=1e-5)


def test_init_from_bart_refuses_wrong_dictionary(tmp_path):
    task = make_task(WORDS)
    args, bart = tiny_bart(task)
    save_fairseq_checkpoint(args, bart, tmp_path / "model.pt")
    make_task(WORDS[:10]).source_dictionary.save(str(tmp_path / "dict.txt"))
    out = subprocess.run([console("elmer-init-from-bart"),
                          str(tmp_path / "model.pt"), str(tmp_path / "out")], capture_output=True, text=True)
    assert out.returncode != 0
    assert "rows: give the dictionary the checkpoint was trained with" in out.stderr


def test_convert_hf_bart(tmp_path):
    transformers = pytest.importorskip("transformers")
    task = make_task(WORDS)
    vocab = len(task.source_dictionary)  # 4 specials + words + <mask>
    config = transformers.BartConfig(
        vocab_size=vocab, d_model=16, encoder_layers=2, decoder_layers=3, encoder_ffn_dim=32,
        decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
        max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )
    torch.manual_seed(0)
    hf = transformers.BartForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "hf")
    plain = make_task(WORDS).source_dictionary
    plain.symbols.pop(), plain.count.pop(), plain.indices.pop("<mask>")
    plain.save(str(tmp_path / "dict.txt"))

    out = tmp_path / "elmer"
    run_script("elmer-convert-hf", str(tmp_path / "hf"), str(out), "--dict", str(tmp_path / "dict.txt"))
    elmer, _ = load_elmer(out)

    pad = task.source_dictionary.pad()
    src, src_len = encode(task, SOURCES)  # right-padded, as Hugging Face positions assume
    src_mask = src.ne(pad)
    with torch.no_grad():
        theirs = hf.model.encoder(input_ids=src, attention_mask=src_mask.long()).last_hidden_state
        mine = elmer.encoder(src, src_lengths=src_len)
        assert torch.allclose(mine["encoder_out"][0].transpose(0, 1)[src_mask], theirs[src_mask], atol=1e-5)

        canvas = elmer.initialize_canvas(src_len)
        keep = canvas.ne(pad)
        # transformers' BART decoder with a bidirectional (non-causal) self-attention mask
        full = keep[:, None, None, :].expand(-1, 1, canvas.size(1), -1)
        ref = hf.model.decoder(
            input_ids=canvas, attention_mask=full, encoder_hidden_states=theirs,
            encoder_attention_mask=src_mask.long(),
        ).last_hidden_state
        states, _ = elmer(src, src_len, canvas)
        assert torch.allclose(states[keep], ref[keep], atol=1e-5)
        logits = elmer.decoder.off_ramp(states, elmer.num_exit_layers)
        assert torch.allclose(logits[keep], hf.lm_head(ref)[keep], atol=1e-5)
        # and it is not the causal decoder: a causal run differs
        causal = hf.model.decoder(input_ids=canvas, encoder_hidden_states=theirs,
                                  encoder_attention_mask=src_mask.long()).last_hidden_state
        assert not torch.allclose(states[keep], causal[keep], atol=1e-3)


def test_hf_dictionary_from_gpt2_encoder_json(tmp_path):
    from elmer_fairseq.convert_hf import fairseq_dictionary

    tokens = ["\u0120the", "\u0120cat", "."]
    hf_vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{t: 4 + i for i, t in enumerate(tokens)}, "<mask>": 7}
    (tmp_path / "vocab.json").write_text(json.dumps(hf_vocab))
    (tmp_path / "encoder.json").write_text(json.dumps({".": 13, "\u0120the": 262, "\u0120cat": 3797}))
    d = fairseq_dictionary(str(tmp_path), 8, encoder_json=str(tmp_path / "encoder.json"))
    assert d.symbols[4:] == ["262", "3797", "13"]
    with pytest.raises(ValueError, match="--dict"):
        fairseq_dictionary(str(tmp_path), 8)


def test_converters_refuse_a_code_payload(tmp_path):
    """Both converters load with weights_only=True: a checkpoint that would run code is refused."""
    from helpers import write_payload_checkpoint

    marker = tmp_path / "pwned"
    write_payload_checkpoint(tmp_path / "model.pt", marker)
    make_task(WORDS).source_dictionary.save(str(tmp_path / "dict.txt"))
    out = subprocess.run([console("elmer-init-from-bart"),
                          str(tmp_path / "model.pt"), str(tmp_path / "out")], capture_output=True, text=True)
    assert out.returncode != 0 and "weights_only" in out.stderr.lower() + out.stdout.lower()
    (tmp_path / "hf").mkdir()
    os.replace(tmp_path / "model.pt", tmp_path / "hf" / "pytorch_model.bin")
    (tmp_path / "hf" / "config.json").write_text("{}")
    out = subprocess.run([console("elmer-convert-hf"), str(tmp_path / "hf"),
                          str(tmp_path / "out2"), "--dict", str(tmp_path / "dict.txt")], capture_output=True, text=True)
    assert out.returncode != 0 and "weights_only" in out.stderr.lower()
    assert not marker.exists()
