"""The vectorised LPLM loss (Eq. 9) against a naive per-token reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import make_model, make_sample
from elmer_fairseq.canvas import align_targets
from elmer_fairseq.lplm_criterion import LPLMCriterion
from naive_decoder import naive_decode

SOURCES = ["the cat sat on the mat", "a dog ran", "big red dog"]
TARGETS = ["cat sat", "dog ran fast under the tree", "red"]


def naive_lplm(model, sample, exit_layers, eps):
    """Sum over tokens of the (smoothed) NLL at each token's exit layer, one token at a time."""
    pad = model.decoder.padding_idx
    src = sample["net_input"]["src_tokens"]
    src_len = sample["net_input"]["src_lengths"]
    canvas = model.initialize_canvas(src_len)
    saved, _ = naive_decode(model, src, src_len, canvas, exit_layers)
    target = sample["target"]
    loss = nll = 0.0
    for b in range(canvas.size(0)):
        n_ref = int(target[b].ne(pad).sum())
        n_slots = int(canvas[b].ne(pad).sum())
        for t in range(min(n_ref, n_slots)):
            e = int(exit_layers[b, t])
            lprobs = F.log_softmax(model.decoder.off_ramp(saved[b, t], e).double(), -1)
            tok_nll = -lprobs[target[b, t]]
            eps_i = eps / (lprobs.numel() - 1)
            loss += (1 - eps - eps_i) * tok_nll + eps_i * -lprobs.sum()
            nll += tok_nll
    return loss, nll


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("per_layer", [False, True])
def test_vectorised_loss_equals_naive_loop(task, k, eps, per_layer):
    model = make_model(task, per_layer_off_ramps=per_layer, canvas_len_a=0.0, canvas_len_b=5)
    sample = make_sample(task, SOURCES, TARGETS)
    crit = LPLMCriterion(task, lplm_samples=k, label_smoothing=eps)
    canvas = model.initialize_canvas(sample["net_input"]["src_lengths"])
    gen = torch.Generator().manual_seed(k)
    draws = torch.randint(1, model.num_exit_layers + 1, (k * canvas.size(0), canvas.size(1)), generator=gen)
    loss, sample_size, log = crit(model, sample, exit_layers=draws)

    ref_loss = ref_nll = 0.0
    for j in range(k):
        rows = torch.arange(canvas.size(0)) * k + j  # draws are grouped per sentence
        l, n = naive_lplm(model, sample, draws[rows], eps)
        ref_loss, ref_nll = ref_loss + l / k, ref_nll + n / k
    assert math.isclose(loss.item(), ref_loss.item(), rel_tol=1e-5)
    assert math.isclose(log["nll_loss"].item(), ref_nll.item(), rel_tol=1e-5)
    # canvas of 5: the second target (6 tokens + </s>) is cut to 5 and counted
    assert sample_size == 3 + 5 + 2
    assert int(log["long_targets"]) == 1


def test_hand_computed_loss_with_uniform_off_ramp(task):
    """A zero off-ramp predicts uniformly: the loss is exactly n * ln(V)."""
    model = make_model(task, canvas_len_a=0.0, canvas_len_b=8)
    torch.nn.init.zeros_(model.decoder.embed_tokens.weight)  # tied to the off-ramp
    sample = make_sample(task, SOURCES, TARGETS)
    loss, sample_size, log = LPLMCriterion(task)(model, sample)
    V = len(task.target_dictionary)
    assert sample_size == 3 + 7 + 2
    assert math.isclose(loss.item(), sample_size * math.log(V), rel_tol=1e-5)


def test_gradients_reach_every_off_ramp_and_the_encoder(task):
    model = make_model(task, per_layer_off_ramps=True, canvas_len_a=0.0, canvas_len_b=8)
    model.train()
    sample = make_sample(task, SOURCES, TARGETS)
    canvas = model.initialize_canvas(sample["net_input"]["src_lengths"])
    # every layer gets some tokens
    layers = (torch.arange(canvas.size(1)) % model.num_exit_layers + 1).expand_as(canvas).contiguous()
    loss, _, _ = LPLMCriterion(task)(model, sample, exit_layers=layers)
    loss.backward()
    for i, ramp in enumerate(model.decoder.off_ramps):
        assert ramp.weight.grad is not None and ramp.weight.grad.abs().sum() > 0, f"off-ramp {i + 1}"
    for name, p in model.encoder.named_parameters():
        if name.startswith("layers."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in model.decoder.layers.named_parameters():
        assert p.grad is not None, name


def test_align_targets_modes():
    pad, eos, mask = 1, 2, 9
    canvas = torch.tensor([[mask] * 5, [mask] * 3 + [pad] * 2])
    target = torch.tensor([[5, 6, eos, pad], [5, 6, 7, eos]])
    tg, m, n_long = align_targets(target, canvas, pad, eos, "ignore", "truncate")
    assert tg.tolist() == [[5, 6, eos, pad, pad], [5, 6, 7, pad, pad]]
    assert m.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert int(n_long) == 1
    tg, m, _ = align_targets(target, canvas, pad, eos, "eos", "skip")
    assert tg.tolist() == [[5, 6, eos, eos, eos], [5, 6, 7, pad, pad]]
    assert m.tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]
    tg, m, _ = align_targets(target, canvas, pad, eos, "pad", "truncate")
    assert tg.tolist() == [[5, 6, eos, pad, pad], [5, 6, 7, pad, pad]]
    assert m.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def test_bad_options_are_rejected_with_the_flag(task):
    with pytest.raises(ValueError, match="--lplm-samples"):
        LPLMCriterion(task, lplm_samples=0)
    with pytest.raises(ValueError, match="--canvas-len"):
        make_model(task, canvas_len_a=0.0, canvas_len_b=0)
