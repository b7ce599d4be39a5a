"""Soft exit's screened inner argmax (elmer_fairseq/screened_argmax.py): the same token as the full fp32
projection, its error bound, its fallback, and the same generations with the screen on and off."""

import pytest
import torch
import torch.nn.functional as F

from helpers import encode, make_model, make_task
from elmer_fairseq.early_exit_generator import EarlyExitGenerator
from elmer_fairseq.screened_argmax import (
    ROUNDING, LowPrecisionWeight, ScreenStats, full_argmax, screened_argmax)


def screen(x, weight, banned=(), k=16, stats=None):
    low, norm = LowPrecisionWeight().get(weight)
    return screened_argmax(x, weight, low, norm, banned, k=k, stats=stats)


def test_full_argmax_by_hand():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    x = torch.tensor([[2.0, 1.0], [0.0, 3.0]])  # logits [2, 1, 3, 3] and [0, 3, 3, 3]
    assert full_argmax(x, weight, ()).tolist() == [2, 1]  # ties go to the lower id
    assert full_argmax(x, weight, (2,)).tolist() == [3, 1]


@pytest.mark.parametrize("scale", [0.05, 1.0, 30.0])
def test_screened_argmax_equals_the_full_projection(scale):
    g = torch.Generator().manual_seed(0)
    V, C = 3000, 64
    weight = torch.randn(V, C, generator=g) * scale / C**0.5
    weight[7] = weight[1500]  # exact ties: the lower id wins in both
    x = torch.randn(5, 9, C, generator=g) * 4
    x[0, 0] = weight[1500] * 50  # a position whose best logit is the tie
    x[4, 8] = 0  # a zero state (padding): every logit 0, the lowest allowed id
    banned = (1, 2, 3)
    stats = ScreenStats()
    got = screen(x, weight, banned, stats=stats)
    assert got.shape == (5, 9)
    assert torch.equal(got, full_argmax(x, weight, banned))
    assert got[0, 0] == 7 and got[4, 8] == 0
    assert screen(torch.zeros(2, C), weight, (0, 1, 3)).tolist() == [2, 2]
    assert stats.calls == 1


def test_the_error_bound_holds_for_every_logit():
    g = torch.Generator().manual_seed(1)
    for scale in (0.01, 1.0, 100.0):
        weight = torch.randn(2000, 256, generator=g) * scale
        x = torch.randn(40, 256, generator=g) * scale
        low, norm = LowPrecisionWeight().get(weight)
        approx = F.linear(x.to(torch.bfloat16), low).double()
        exact = x.double() @ weight.double().t()
        bound = ROUNDING * norm * x.double().norm(dim=-1, keepdim=True)
        assert ((approx - exact).abs() <= bound).all()
        # and it is not vacuous: the largest error is within 100x of it
        assert (approx - exact).abs().max() > (bound / 100).min()


def test_a_flat_distribution_falls_back_to_the_full_projection():
    g = torch.Generator().manual_seed(2)
    weight = torch.ones(500, 32) + 1e-4 * torch.randn(500, 32, generator=g)  # every logit within the screen
    x = torch.randn(3, 32, generator=g)
    stats = ScreenStats()
    assert torch.equal(screen(x, weight, (0,), stats=stats), full_argmax(x, weight, (0,)))
    assert stats.fallbacks == 1
    peaked = weight.clone()
    peaked[42] *= 10
    stats = ScreenStats()
    screen(x.abs(), peaked, stats=stats)
    assert stats.fallbacks == 0


def test_the_low_precision_copy_follows_in_place_updates():
    weight = torch.randn(50, 8)
    copy = LowPrecisionWeight()
    first, _ = copy.get(weight)
    assert copy.get(weight)[0] is first  # cached
    with torch.no_grad():
        weight.mul_(2)
    again, norm = copy.get(weight)
    assert again is not first and torch.equal(again, weight.to(torch.bfloat16))
    assert norm == pytest.approx(float(weight.norm(dim=-1).max()))


def test_soft_exit_generation_is_the_same_with_the_screen_on_and_off():
    words = [f"w{i}" for i in range(400)]
    task = make_task(words)
    model = make_model(task, early_exit="soft", decoder_layers=3, per_layer_off_ramps=True, canvas_len_b=6)
    with torch.no_grad():  # peaked off-ramps, as trained ones are, so the screen decides itself
        for ramp in model.decoder.off_ramps:
            ramp.weight.mul_(20)
    src, src_len = encode(task, ["w1 w2 w3 w4 w5 w6", "w7 w8 w9", "w10 w11 w12 w13 w14 w15 w16 w17"])
    sample = {"net_input": {"src_tokens": src, "src_lengths": src_len}}
    gen = EarlyExitGenerator(task.target_dictionary)
    dec = model.decoder
    dec.screen_argmax = False
    plain = gen.decode(model, src, src_len)
    assert dec.screen_stats.calls == 0
    dec.screen_argmax = True
    screened = gen.decode(model, src, src_len)
    assert dec.screen_stats.calls == 2  # the inner layers of a 3-layer decoder
    assert dec.screen_stats.fallbacks == 0
    for a, b in zip(plain, screened):
        assert torch.equal(a, b)
    hypos = gen.generate([model], sample)
    assert [h[0]["tokens"].tolist() for h in hypos] == [
        plain[0][i, : plain[3][i]].tolist() for i in range(3)]


def test_benchmark_decoder_setting_applies_for_the_call_and_restores():
    """scripts/benchmark.py's DecoderSetting: the decoder attributes hold during the wrapped generation
    (the 'full fp32 inner argmax' and 'masked loop' rows) and are put back after it, also after an error."""
    import os
    import sys
    import types

    from helpers import REPO

    sys.path.insert(0, os.path.join(REPO, "scripts"))
    from benchmark import DecoderSetting

    decoder = types.SimpleNamespace(screen_argmax=True, skip_exited=True)
    model = types.SimpleNamespace(decoder=decoder)
    seen = []

    class Gen:
        def generate(self, models, sample, **kw):
            seen.append((decoder.screen_argmax, decoder.skip_exited))
            if sample == "fail":
                raise RuntimeError("boom")
            return "out"

    wrapped = DecoderSetting(Gen(), screen_argmax=False)
    assert wrapped.generate([model], "ok") == "out"
    with pytest.raises(RuntimeError):
        wrapped.generate([model], "fail")
    assert seen == [(False, True), (False, True)]
    assert decoder.screen_argmax is True and decoder.skip_exited is True
