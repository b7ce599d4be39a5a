"""elmer_nat has BART-base's shape, so BART-base weights fit."""

import argparse

import pytest
from fairseq.models import ARCH_CONFIG_REGISTRY
from fairseq.models.bart import BARTModel

from helpers import make_task
from elmer_fairseq.elmer_nat_model import ElmerNATConfig, ElmerNATModel


def test_base_architecture_matches_fairseq_bart_base():
    words = [f"w{i}" for i in range(500)]
    task = make_task(words)
    elmer = ElmerNATModel.build_model(
        ElmerNATConfig(max_source_positions=1024, max_target_positions=1024), task
    )
    args = argparse.Namespace(max_source_positions=1024, max_target_positions=1024)
    ARCH_CONFIG_REGISTRY["bart_base"](args)
    bart = BARTModel.build_model(args, task)

    ours = {k: v.shape for k, v in elmer.state_dict().items()}
    theirs = {k: v.shape for k, v in bart.state_dict().items()}
    shared = [k for k in theirs if k.startswith("encoder.") or k.startswith("decoder.layers.")
              or k.startswith("decoder.embed_") or k.startswith("decoder.layernorm_embedding")]
    assert len(shared) > 100
    for k in shared:
        assert ours.get(k) == theirs[k], k
    # the one off-ramp is BART's output projection, tied to the shared embeddings
    assert ours["decoder.off_ramps.0.weight"] == theirs["decoder.output_projection.weight"]
    assert elmer.decoder.off_ramps[0].weight is elmer.encoder.embed_tokens.weight
    n_ours = sum(p.numel() for p in elmer.parameters())
    n_bart = sum(p.numel() for p in bart.parameters())
    assert n_ours == n_bart
    # post-norm, embedding layer norm, GELU, unscaled embeddings, 6+6 layers
    assert len(elmer.encoder.layers) == 6 and elmer.num_exit_layers == 6
    assert elmer.decoder.embed_scale == 1.0 and elmer.decoder.ramp_norm is None
    assert elmer.decoder.layers[0].normalize_before is False


def test_fairseq_share_flags_are_accepted_and_contradictions_refused(task):
    from helpers import make_model

    shared = make_model(task, share_all_embeddings=True, share_decoder_input_output_embed=True)
    assert shared.encoder.embed_tokens is shared.decoder.embed_tokens
    assert shared.decoder.off_ramps[-1].weight is shared.decoder.embed_tokens.weight
    with pytest.raises(ValueError, match="--share-all-embeddings and --no-share-all-embeddings"):
        make_model(task, share_all_embeddings=True, no_share_all_embeddings=True)


def test_fairseq_compat_flags_are_honoured_or_refused(task):
    """--encoder/decoder-learned-pos, --layernorm-embedding and --no-scale-embedding are what elmer_nat already
    does (a contradiction is refused); --apply-bert-init re-initialises as fairseq's NAT models do."""
    from helpers import make_model

    default = make_model(task)
    bert = make_model(task, apply_bert_init=True, encoder_learned_pos=True, decoder_learned_pos=True,
                      layernorm_embedding=True, no_scale_embedding=True)
    fc1 = bert.decoder.layers[0].fc1
    # init_bert_params: Linear ~ N(0, 0.02), bias 0; the default (xavier) has a wider spread at this size
    assert abs(fc1.weight.std().item() - 0.02) < 0.003 and fc1.bias.abs().max().item() == 0
    assert abs(default.decoder.layers[0].fc1.weight.std().item() - 0.02) > 0.01
    for yes, no in [("encoder_learned_pos", "sinusoidal_encoder_positions"),
                    ("layernorm_embedding", "no_layernorm_embedding"), ("no_scale_embedding", "scale_embedding")]:
        flags = f"--{yes.replace('_', '-')} and --{no.replace('_', '-')} contradict"
        with pytest.raises(ValueError, match=flags):
            make_model(task, **{yes: True, no: True})
