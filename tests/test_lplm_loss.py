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


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_fused_smoothed_nll_equals_fairseq_loss_and_gradient(eps):
    """lplm_criterion.smoothed_nll (one autograd function, weighted positions in place) against fairseq's
    label_smoothed_nll_loss on log_softmax of the gathered positions: the same sums and gradients,
    for any pair of output gradients, and zero gradient at the positions of weight 0."""
    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
    from elmer_fairseq.lplm_criterion import smoothed_nll

    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(6, 4, 23, generator=gen)).requires_grad_()
    target = torch.randint(0, 23, (6, 4), generator=gen)
    weight = torch.rand(6, 4, generator=gen) > 0.3
    loss, nll = smoothed_nll(logits, target, eps, weight)
    (2.0 * loss + 3.0 * nll).backward()
    got = logits.grad.clone()
    logits.grad = None
    ref_loss, ref_nll = label_smoothed_nll_loss(torch.log_softmax(logits[weight], -1), target[weight], eps, reduce=True)
    (2.0 * ref_loss + 3.0 * ref_nll).backward()
    assert torch.allclose(loss, ref_loss, rtol=1e-5) and torch.allclose(nll, ref_nll, rtol=1e-5)
    assert torch.allclose(got, logits.grad, atol=1e-6)
    assert got[~weight].abs().max() == 0
    # no weight: every position
    all_loss, _ = smoothed_nll(logits, target, eps)
    ref_all, _ = label_smoothed_nll_loss(torch.log_softmax(logits.reshape(-1, 23), -1), target.reshape(-1), eps, reduce=True)
    assert torch.allclose(all_loss, ref_all, rtol=1e-5)
    # bf16 logits (--autocast-bf16): fp32 sums, the gradient in bf16 within its rounding
    low = logits.detach().bfloat16().requires_grad_()
    low_loss, _ = smoothed_nll(low, target, eps, weight)
    (2.0 * low_loss).backward()
    high = low.detach().float().requires_grad_()
    ref_low, _ = label_smoothed_nll_loss(torch.log_softmax(high[weight], -1), target[weight], eps, reduce=True)
    (2.0 * ref_low).backward()
    assert low_loss.dtype == torch.float32 and torch.allclose(low_loss, ref_low, rtol=1e-5)
    assert low.grad.dtype == torch.bfloat16 and torch.allclose(low.grad.float(), high.grad, atol=2e-2)


def test_allowed_argmax_equals_ban_then_argmax():
    from elmer_fairseq.exit_policies import allowed_argmax, ban_tokens

    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(9, 5, 40, generator=gen)
    scores[0, 0, 2] = 50.0  # a banned id that would win
    scores[1, 1, [1, 2, 3]] = 60.0  # every banned id above the rest
    scores[2, 2, [7, 30]] = 70.0  # a tie: the lower id, as argmax
    banned = [1, 2, 3]
    got = allowed_argmax(scores, banned)
    assert torch.equal(got, ban_tokens(scores, banned).argmax(-1))
    assert got[2, 2] == 7 and not torch.isin(got, torch.tensor(banned)).any()
    assert torch.equal(allowed_argmax(scores, []), scores.argmax(-1))
    # nothing banned, a vocabulary-sized bf16 row (the CPU path takes max's indices): ties to the lower id
    wide = torch.randn(6, 8000, generator=gen).to(torch.bfloat16)
    wide[:3, [4000, 6000, 7999]] = 9.0
    wide[3, [17, 16]] = 9.0
    assert torch.equal(allowed_argmax(wide, []), wide.float().argmax(-1))
    assert allowed_argmax(wide, [])[:4].tolist() == [4000, 4000, 4000, 16]
    # ban_tokens against a mask built independently; the input is left as it was
    before = scores.clone()
    mask = torch.zeros(40, dtype=torch.bool)
    mask[banned] = True
    assert torch.equal(ban_tokens(scores, banned), scores.masked_fill(mask, float("-inf")))
    assert torch.equal(scores, before)


def test_autocast_bf16_option_keeps_the_loss_and_fp32_gradients(task):
    """--autocast-bf16: the task runs the criterion's forward under bf16 autocast; the loss stays
    within bf16 rounding of the fp32 loss, and the parameters and their gradients stay fp32."""
    from elmer_fairseq.nat_early_exit_task import NATEarlyExitConfig, NATEarlyExitTask

    sample = make_sample(task, SOURCES, TARGETS)
    losses, dtypes = {}, {}
    for bf16 in (False, True):
        t = NATEarlyExitTask(NATEarlyExitConfig(autocast_bf16=bf16), task.src_dict, task.tgt_dict)
        model = make_model(t, seed=4, early_exit="soft", canvas_len_a=0.0, canvas_len_b=8)
        crit = LPLMCriterion(t, label_smoothing=0.1)
        seen = {}
        handle = model.decoder.off_ramps[0].register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))

        class Optimizer:  # what fairseq's train_step asks of the optimizer
            def backward(self, loss):
                loss.backward()

        loss, _, _ = t.train_step(sample, model, crit, Optimizer(), update_num=0)
        handle.remove()
        losses[bf16], dtypes[bf16] = loss.item(), seen["dtype"]
        assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
                   for p in model.parameters())
    assert dtypes == {False: torch.float32, True: torch.bfloat16}
    assert losses[True] != losses[False] and math.isclose(losses[True], losses[False], rel_tol=2e-2)
