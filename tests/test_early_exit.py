"""Hard (Eq. 10) and soft (Eq. 11-12) early exit against naive references."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import encode, make_model, make_sample
from naive_decoder import decoder_layer, naive_entropy_exit_layers
from elmer_fairseq.early_exit_generator import EarlyExitGenerator, collapse_repeats
from elmer_fairseq.exit_policies import EntropyExit, SoftExit, banned_tokens
from elmer_fairseq.lplm_criterion import LPLMCriterion
from elmer_fairseq.generation_io import ExitLayerReport, read_exit_layers

SOURCES = ["the cat sat on the mat", "a dog ran", "big red dog"]
TARGETS = ["cat sat", "dog ran fast under the tree", "red"]


# ---------------------------------------------------------------- hard exit


def entropy_quantiles(model, src, src_len, canvas):
    """Thresholds that let some, not all, tokens exit at layer 1."""
    _, extra = model(src, src_len, canvas, return_all_hiddens=True)
    lp = model.decoder.off_ramp_log_probs(extra["inner_states"][1], 1)
    entropy = (-(lp.exp() * lp).sum(-1).t()[canvas.ne(model.decoder.padding_idx)]).sort().values
    # midpoints between neighbouring entropies: no token sits on the threshold
    picks = [int(q * (len(entropy) - 1)) for q in (0.3, 0.5, 0.7)]
    return [float(entropy[i] + entropy[i + 1]) / 2 for i in picks]


def test_work_skipping_hard_exit_equals_the_masked_loop(task, monkeypatch):
    """Without gradient, hard exit runs each layer on the running tokens only (packed per sentence);
    the exit layers, predictions and exit states equal the masked loop's (which runs every token),
    at thresholds that split the tokens over the layers, with padding in the batch, pre- and post-norm."""
    import elmer_fairseq.elmer_nat_model as elmer_nat_model

    packed = []
    real = elmer_nat_model.run_layer_for_queries
    monkeypatch.setattr(elmer_nat_model, "run_layer_for_queries", lambda layer, xq, x, *a: packed.append(
        (xq.size(0), x.size(0))) or real(layer, xq, x, *a))
    for normalize_before in (False, True):
        model = make_model(task, decoder_layers=4, decoder_normalize_before=normalize_before)
        src, src_len = encode(task, SOURCES)
        canvas = model.initialize_canvas(src_len)
        pad = canvas.eq(model.decoder.padding_idx)
        assert pad.any()
        d = task.target_dictionary
        for threshold in entropy_quantiles(model, src, src_len, canvas) + [1e9]:
            policy = EntropyExit(threshold, banned=banned_tokens(d), eos=d.eos())
            with torch.no_grad():
                states, extra = model(src, src_len, canvas, policy=policy)  # the work-skipping pass
            with torch.enable_grad():
                ref_states, ref = model(src, src_len, canvas, policy=policy)  # the masked loop
            assert torch.equal(extra["exit_layers"], ref["exit_layers"])
            keep = ~pad
            for key in ("tokens", "scores", "eos_scores"):
                got, want = extra["predictions"][key][keep], ref["predictions"][key][keep].detach()
                assert torch.allclose(got.float(), want.float(), atol=1e-5), key
            assert torch.allclose(states[keep], ref_states[keep].detach(), atol=1e-5)
            if threshold < 1e9:
                assert len(set(ref["exit_layers"][keep].tolist())) > 1  # tokens exit at different layers
    assert packed and all(r < t for r, t in packed)  # layers really ran on fewer query positions


def test_hard_exit_layers_match_naive_loop(task):
    model = make_model(task, decoder_layers=4)
    src, src_len = encode(task, SOURCES)
    canvas = model.initialize_canvas(src_len)
    for threshold in entropy_quantiles(model, src, src_len, canvas):
        _, extra = model(src, src_len, canvas, policy=EntropyExit(threshold))
        naive = naive_entropy_exit_layers(model, src, src_len, canvas, threshold)
        got = {(b, t): int(extra["exit_layers"][b, t]) for (b, t) in naive}
        assert got == naive
        assert len(set(naive.values())) > 1  # the thresholds really split the tokens


def test_hard_exit_states_bit_identical_above_exit(task):
    model = make_model(task)
    src, src_len = encode(task, SOURCES)
    canvas = model.initialize_canvas(src_len)
    threshold = entropy_quantiles(model, src, src_len, canvas)[1]

    class NoStop(EntropyExit):
        may_stop_early = False

    states, extra = model(src, src_len, canvas, policy=NoStop(threshold), return_all_hiddens=True)
    inner = extra["inner_states"]
    layers = extra["exit_layers"]
    for b, t in layers.nonzero().tolist():
        e = int(layers[b, t])
        for level in range(e, len(inner)):
            assert torch.equal(inner[level][t, b], inner[e][t, b])
        assert torch.equal(states[b, t], inner[e][t, b])


def test_early_stop_gives_the_same_output_as_all_layers(task, monkeypatch):
    model = make_model(task)
    sample = make_sample(task, SOURCES, TARGETS)
    src, src_len = encode(task, SOURCES)
    canvas = model.initialize_canvas(src_len)
    threshold = entropy_quantiles(model, src, src_len, canvas)[2]
    gen = EarlyExitGenerator(task.target_dictionary, exit_threshold=threshold)
    stopped = gen.generate([model], sample)
    monkeypatch.setattr(EntropyExit, "may_stop_early", False)
    full = gen.generate([model], sample)
    for a, b in zip(stopped, full):
        assert torch.equal(a[0]["tokens"], b[0]["tokens"])
        assert torch.equal(a[0]["positional_scores"], b[0]["positional_scores"])
        assert torch.equal(a[0]["exit_layers"], b[0]["exit_layers"])


def test_hard_training_loss_at_the_rule_exit_layers(task):
    model = make_model(task, early_exit="hard", model_exit_threshold=1e9, canvas_len_a=0.0, canvas_len_b=8)
    sample = make_sample(task, SOURCES, TARGETS)
    loss, size, log = LPLMCriterion(task)(model, sample)
    # a huge δ: every token exits at layer 1, so the loss is the layer-1 off-ramp's NLL
    ones = torch.ones_like(model.initialize_canvas(sample["net_input"]["src_lengths"]))
    ref, _, _ = LPLMCriterion(task)(make_model(task, canvas_len_a=0.0, canvas_len_b=8), sample, exit_layers=ones)
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-6)
    assert log["exit_layer_sum"] == size


# ---------------------------------------------------------------- soft exit


def test_soft_next_layer_receives_w_of_embedding_and_state(task, monkeypatch):
    model = make_model(task, early_exit="soft")
    dec = model.decoder
    d = task.target_dictionary
    forced = d.index("dog")

    def rigged(states, layer):  # the off-ramp's argmax is "dog" everywhere
        logits = torch.zeros(states.shape[:-1] + (len(d),))
        logits[..., forced] = 5.0
        return logits

    monkeypatch.setattr(dec, "off_ramp", rigged)
    dec.screen_argmax = False  # the argmax from the rigged off-ramp (the screen reads the weights)
    seen = {}
    dec.layers[0].register_forward_hook(lambda m, i, o: seen.__setitem__("out1", o[0].detach().clone()))
    dec.layers[1].register_forward_pre_hook(lambda m, i: seen.__setitem__("in2", i[0].detach().clone()))
    src, src_len = encode(task, SOURCES)
    canvas = model.initialize_canvas(src_len)
    model(src, src_len, canvas, policy=SoftExit())
    h = seen["out1"]
    emb = dec.embed_scale * dec.embed_tokens.weight[forced].expand_as(h)
    expected = torch.cat([emb, h], -1) @ dec.soft_mixers[0].weight.t()
    real = canvas.ne(dec.padding_idx).t()  # padding positions carry no state
    torch.testing.assert_close(seen["in2"][real], expected[real], rtol=0, atol=1e-6)


def test_soft_pass_without_bookkeeping_equals_the_general_loop(task):
    """Without gradient a soft-exit pass runs the layers and the Eq. 12 mixing alone (``_last_layer_pass``);
    the general loop (taken with ``return_all_hiddens``) must give the same states at every non-padding
    position, the same exit layers, and the same kept inner logits there."""
    model = make_model(task, early_exit="soft", decoder_layers=3)
    src, src_len = encode(task, SOURCES)  # three lengths: the canvas has padding
    canvas = model.initialize_canvas(src_len)
    real = canvas.ne(model.decoder.padding_idx)
    assert not real.all()
    with torch.no_grad():
        fast, fast_extra = model(src, src_len, canvas, policy=SoftExit(keep_logits=True))
        loop, loop_extra = model(src, src_len, canvas, policy=SoftExit(keep_logits=True), return_all_hiddens=True)
    assert fast_extra["inner_states"] is None and loop_extra["inner_states"] is not None  # two paths taken
    torch.testing.assert_close(fast[real], loop[real], rtol=0, atol=0)
    assert torch.equal(fast_extra["exit_layers"], loop_extra["exit_layers"])
    assert len(fast_extra["predictions"]["layer_logits"]) == 2
    for a, b in zip(fast_extra["predictions"]["layer_logits"], loop_extra["predictions"]["layer_logits"]):
        torch.testing.assert_close(a[real.t()], b[real.t()], rtol=0, atol=0)


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_soft_gold_mixing(task, prob):
    model = make_model(task, early_exit="soft")
    dec = model.decoder
    T, B, C = 5, 2, 16
    states = torch.randn(T, B, C)
    gold = torch.randint(4, 10, (B, T))
    gold_mask = torch.ones(B, T, dtype=torch.bool)
    gold_mask[1, 3:] = False  # no reference there: always the prediction
    out = SoftExit(gold=gold, gold_mask=gold_mask, gold_prob=prob).transform(1, states, dec, {})
    predicted = dec.off_ramp(states, 1).argmax(-1)
    used = torch.where(gold_mask.t() & (prob == 1.0), gold.t(), predicted)
    torch.testing.assert_close(out, dec.soft_mix(used, states, 1), rtol=0, atol=0)


def naive_soft_loss(model, sample, targets, mask):
    """Layer by layer: CE of every layer's off-ramp on each target token, mean over layers."""
    dec = model.decoder
    src, src_len = sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"]
    canvas = model.initialize_canvas(src_len)
    enc = model.encoder(src, src_lengths=src_len)
    x = dec.embed(canvas)
    pad = canvas.eq(dec.padding_idx)
    L = len(dec.layers)
    total = 0.0
    for idx in range(L):
        y = decoder_layer(dec, enc, idx, x, pad)
        for b, t in mask.nonzero().tolist():
            lp = F.log_softmax(dec.off_ramp(y[t, b], idx + 1).double(), -1)
            total += -lp[targets[b, t]] / L
        if idx < L - 1:
            logits = dec.off_ramp(y, idx + 1)
            for banned in banned_tokens(dec.dictionary):  # <pad>, <s>, <mask>: never fed, as in generation
                logits[..., banned] = float("-inf")
            x = dec.soft_mix(logits.argmax(-1), y, idx + 1)
    return total


@pytest.mark.parametrize("per_layer", [False, True])
def test_soft_loss_equals_naive_per_layer_reference(task, per_layer):
    from elmer_fairseq.canvas import align_targets

    model = make_model(task, early_exit="soft", canvas_len_a=0.0, canvas_len_b=8, per_layer_off_ramps=per_layer)
    sample = make_sample(task, SOURCES, TARGETS)
    d = task.target_dictionary
    canvas = model.initialize_canvas(sample["net_input"]["src_lengths"])
    targets, mask, _ = align_targets(sample["target"], canvas, d.pad(), d.eos(), "ignore", "truncate")
    loss, size, log = LPLMCriterion(task)(model, sample)  # eval mode: no gold mixing
    assert math.isclose(loss.item(), naive_soft_loss(model, sample, targets, mask).item(), rel_tol=1e-5)
    assert log["exit_layer_sum"] == size * model.num_exit_layers


def test_soft_model_loads_an_lplm_checkpoint(task):
    lplm = make_model(task)
    soft = make_model(task, early_exit="soft", seed=5)
    soft.load_state_dict(lplm.state_dict())
    assert torch.equal(soft.decoder.layers[0].fc1.weight, lplm.decoder.layers[0].fc1.weight)


def test_soft_generation_rejects_a_threshold(task):
    model = make_model(task, early_exit="soft")
    sample = make_sample(task, SOURCES, TARGETS)
    with pytest.raises(ValueError, match="--exit-threshold"):
        EarlyExitGenerator(task.target_dictionary, exit_threshold=0.5).generate([model], sample)


# ---------------------------------------------------------------- repeats, reporting


def test_collapse_repeats_matches_naive_loop():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 7, (50, 8), generator=gen)
    lengths = torch.randint(0, 9, (50,), generator=gen)
    scores = torch.randn(50, 8, generator=gen)
    out, new_len, out_scores = collapse_repeats(tokens, lengths, scores)
    for i in range(50):
        row, kept_scores = [], []
        for t in range(int(lengths[i])):
            if not row or tokens[i, t] != tokens[i, t - 1]:
                row.append(int(tokens[i, t]))
                kept_scores.append(float(scores[i, t]))
        assert out[i, : new_len[i]].tolist() == row
        assert out_scores[i, : new_len[i]].tolist() == pytest.approx(kept_scores)


def test_exit_layer_report(capsys):
    report = ExitLayerReport()
    two = [[{"exit_layers": torch.tensor([1, 1, 3])}], [{"exit_layers": torch.tensor([2])}]]
    report.add(torch.tensor([7, 3]), two)
    assert capsys.readouterr().out.splitlines() == ["E-7\t1 1 3", "E-3\t2"]
    assert report.summary() == "Exit layers: L1=0.500 L2=0.250 L3=0.250 | mean 1.750 | tokens 4"
    # fairseq-interactive: no ids; one-sentence batches are numbered in order, larger ones only counted
    report = ExitLayerReport()
    report.add(None, two[:1])
    report.add(None, two[1:])
    report.add(None, two)
    assert capsys.readouterr().out.splitlines() == ["E-0\t1 1 3", "E-1\t2"]
    assert report.summary().endswith("tokens 8")


def test_exit_lines_read_back_with_every_layer_of_the_decoder(capsys):
    """The writer and the reader share one format; a layer no token exited at still shows (Figure 2
    shows every layer 1..L), L taken from the summary line."""
    report = ExitLayerReport()
    report.add(torch.tensor([0, 1]), [[{"exit_layers": torch.tensor([1, 1])}], [{"exit_layers": torch.tensor([3])}]],
               num_layers=4)
    report.print_summary()
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "Exit layers: L1=0.667 L2=0.000 L3=0.333 L4=0.000 | mean 1.667 | tokens 3"
    hist = read_exit_layers(out.splitlines(keepends=True))
    assert hist.layers() == [1, 2, 3, 4]
    assert hist.fractions() == pytest.approx({1: 2 / 3, 2: 0.0, 3: 1 / 3, 4: 0.0})
    assert read_exit_layers(out.splitlines()[:-1]).layers() == [1, 2, 3]  # no summary: the highest seen
    with pytest.raises(ValueError, match="--print-exit-layers"):
        read_exit_layers(["H-0\t-1.0\tsome text\n"])
