"""Length rules of the generator, glancing training, and the two training/generation agreements
(soft-exit argmax bans, hard-exit all-layer loss) against naive references."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import encode, make_model, make_sample
from elmer_fairseq.early_exit_generator import EarlyExitGenerator, choose_lengths, length_log_probs
from elmer_fairseq.exit_policies import SoftExit, banned_tokens
from elmer_fairseq.exit_strategies import STRATEGIES, TrainingBatch
from elmer_fairseq.lplm_criterion import LPLMCriterion

SOURCES = ["the cat sat on the mat", "a dog ran", "big red tree"]
TARGETS = ["cat sat", "dog ran fast", "tree"]


def naive_length_probs(p_eos, n_valid, post_eos):
    """P(L = i + 1) for i < n_valid, one position at a time, from the definitions."""
    out = []
    for i in range(n_valid):
        last = i == n_valid - 1
        if post_eos == "pad":
            out.append(p_eos[i])
        elif post_eos == "ignore":
            stay = 1.0
            for j in range(i):
                stay *= 1 - p_eos[j]
            out.append(stay if last else p_eos[i] * stay)
        else:
            cdf = [max(p_eos[: j + 1]) for j in range(n_valid)]
            prev = cdf[i - 1] if i else 0.0
            out.append(1 - prev if last else cdf[i] - prev)
    return out


@pytest.mark.parametrize("post_eos", ["pad", "ignore", "eos"])
def test_length_distribution_matches_the_definitions(post_eos):
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(3, 6, generator=gen) * 0.9 + 0.01
    valid = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 1 + [0] * 5]).bool()
    lp = length_log_probs(p.log(), valid, post_eos)
    for b in range(3):
        n = int(valid[b].sum())
        want = naive_length_probs(p[b].tolist(), n, post_eos)
        got = lp[b, :n].exp().tolist()
        assert got == pytest.approx([max(w, 1e-12) for w in want], rel=1e-4, abs=1e-6)
        assert torch.isinf(lp[b, n:]).all() or (lp[b, n:] < -1e30).all()
    if post_eos != "pad":  # a proper distribution over the valid lengths
        assert (lp.exp() * valid).sum(1).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-4)


def test_mode_and_median_lengths_by_hand():
    # hazards 0.1, 0.6, 0.5, 1: P(L) = 0.1, 0.54, 0.18, 0.18 -> mode 2, median 2 (cdf 0.1, 0.64)
    p = torch.tensor([[0.1, 0.6, 0.5, 0.3]])
    valid = torch.ones_like(p, dtype=torch.bool)
    assert choose_lengths(p.log(), valid, "ignore", "mode").tolist() == [2]
    assert choose_lengths(p.log(), valid, "ignore", "median").tolist() == [2]
    # pad: p(eos) is P(L) directly; 0.2, 0.1, 0.3, 0.4 -> mode 4; median: cdf 0.2, 0.3, 0.6 -> 3
    p = torch.tensor([[0.2, 0.1, 0.3, 0.4]])
    assert choose_lengths(p.log(), valid, "pad", "mode").tolist() == [4]
    assert choose_lengths(p.log(), valid, "pad", "median").tolist() == [3]
    # quantile: the first length whose cdf (0.2, 0.3, 0.6, 1.0) reaches the level; 0.5 is the median
    assert [choose_lengths(p.log(), valid, "pad", "quantile", q).item() for q in (0.15, 0.25, 0.5, 0.55, 0.65, 0.99)] \
        == [1, 2, 3, 3, 4, 4]


def run_generator(task, model, **kw):
    src, src_len = encode(task, SOURCES)
    sample = {"net_input": {"src_tokens": src, "src_lengths": src_len}, "id": torch.arange(len(SOURCES))}
    return EarlyExitGenerator(task.target_dictionary, **kw).generate([model], sample)


@pytest.mark.parametrize("rule", ["mode", "median", "quantile"])
@pytest.mark.parametrize("post_eos", ["pad", "ignore"])
def test_generator_length_rule_against_a_naive_reading(task, rule, post_eos):
    """Each hypothesis: its best non-</s> token at every position before the rule's length, then </s>
    (quantile at level 0.8)."""
    model = make_model(task, seed=2, post_eos=post_eos, canvas_len_b=4)
    d = task.target_dictionary
    level = 0.8 if rule == "quantile" else 0.5
    hypos = run_generator(task, model, exit_threshold=0.0, length_rule=rule, length_quantile=level)
    src, src_len = encode(task, SOURCES)
    canvas = model.initialize_canvas(src_len)
    with torch.no_grad():
        states, _ = model(src, src_len, canvas)
        lprobs = F.log_softmax(model.decoder.off_ramp(states, model.num_exit_layers), -1)
    banned = banned_tokens(d) + [d.eos()]
    for b, nbest in enumerate(hypos):
        n_valid = int(canvas[b].ne(d.pad()).sum())
        p_eos = lprobs[b, :n_valid, d.eos()].exp().tolist()
        probs = naive_length_probs(p_eos, n_valid, post_eos)
        if rule == "mode":
            length = max(range(n_valid), key=lambda i: probs[i]) + 1
        else:
            total, acc, length = sum(probs), 0.0, n_valid
            for i, q in enumerate(probs):
                acc += q
                if acc / total >= level:
                    length = i + 1
                    break
        want = []
        for t in range(length - 1):
            row = lprobs[b, t].clone()
            row[banned] = -math.inf
            want.append(int(row.argmax()))
        assert nbest[0]["tokens"].tolist() == want + [d.eos()]
        assert nbest[0]["positional_scores"][-1].item() == pytest.approx(lprobs[b, length - 1, d.eos()].item(), abs=1e-5)


def test_eos_penalty_only_lengthens(task):
    model = make_model(task, seed=4, canvas_len_b=6)
    base = [h[0]["tokens"].numel() for h in run_generator(task, model, exit_threshold=0.0)]
    longer = [h[0]["tokens"].numel() for h in run_generator(task, model, exit_threshold=0.0, eos_penalty=50.0)]
    src, src_len = encode(task, SOURCES)
    canvas_len = model.initialize_canvas(src_len).ne(task.target_dictionary.pad()).sum(1).tolist()
    assert all(a <= b for a, b in zip(base, longer))
    assert longer == canvas_len  # a huge penalty: </s> never wins, the canvas ends every output


def make_criterion(task, **kw):
    return LPLMCriterion(task, **kw)


def test_glancing_reveals_ratio_times_hamming_distance(task):
    model = make_model(task, seed=5, early_exit="soft")
    sample = make_sample(task, SOURCES, TARGETS)
    crit = make_criterion(task, glat=True, glat_ratio=0.5)
    src, src_len = sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"]
    canvas = model.initialize_canvas(src_len)
    from elmer_fairseq.canvas import align_targets

    d = task.target_dictionary
    targets, mask, _ = align_targets(sample["target"], canvas, d.pad(), d.eos(), "ignore", "truncate")
    torch.manual_seed(0)
    new_canvas, new_mask, revealed = crit._glance(model, {"src_tokens": src, "src_lengths": src_len}, canvas, targets, mask)
    # the naive reference: the generation policy's prediction, counted position by position
    with torch.no_grad():
        states, _ = model(src, src_len, canvas, policy=SoftExit(banned=banned_tokens(d)))
        logits = model.decoder.off_ramp(states, model.num_exit_layers)
        logits[..., banned_tokens(d)] = -math.inf
        pred = logits.argmax(-1)
    for b in range(canvas.size(0)):
        wrong = sum(int(pred[b, t] != targets[b, t]) for t in range(canvas.size(1)) if mask[b, t])
        assert int(revealed[b].sum()) == int(wrong * 0.5)
        for t in range(canvas.size(1)):
            if revealed[b, t]:
                assert mask[b, t] and new_canvas[b, t] == targets[b, t] and not new_mask[b, t]
            else:
                assert new_canvas[b, t] == canvas[b, t] and new_mask[b, t] == mask[b, t]


def test_glancing_ratio_anneals_and_is_off_in_validation(task):
    crit = make_criterion(task, glat=True, glat_ratio=0.5, glat_ratio_end=0.3, glat_anneal_updates=100)
    for n, want in ((0, 0.5), (50, 0.4), (100, 0.3), (500, 0.3)):
        crit.set_num_updates(n)
        assert crit.glancing_ratio() == pytest.approx(want)
    model = make_model(task, seed=5, early_exit="soft")
    sample = make_sample(task, SOURCES, TARGETS)
    _, _, log = crit(model.eval(), sample)
    assert "glat_revealed" not in log
    torch.manual_seed(1)
    _, size, log = crit(model.train(), sample)
    assert int(log["glat_revealed"]) + int(size) == int(log["ntokens"])  # revealed positions carry no loss


@pytest.mark.parametrize("strategy", ["lplm", "hard", "soft"])
def test_glat_trains_every_strategy(task, strategy):
    model = make_model(task, seed=6, early_exit=strategy, model_exit_threshold=1.0).train()
    crit = make_criterion(task, glat=True, glat_ratio=0.5)
    loss, _, _ = crit(model, make_sample(task, SOURCES, TARGETS))
    loss.backward()
    assert torch.isfinite(loss) and model.decoder.layers[0].fc1.weight.grad.abs().sum() > 0


def test_soft_exit_training_bans_the_tokens_generation_bans(task):
    """In eval (no gold mixing) the criterion's last layer is generation's: same states, so its nll
    equals the cross-entropy of generation's logits, also where <mask> would win the argmax."""
    d = task.target_dictionary
    model = make_model(task, seed=7, early_exit="soft", decoder_layers=3)
    with torch.no_grad():  # make <mask> the argmax of the off-ramp almost everywhere
        model.decoder.embed_tokens.weight[d.index("<mask>")] *= 40
    sample = make_sample(task, SOURCES, TARGETS)
    _, _, log = make_criterion(task)(model, sample)
    src, src_len = sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"]
    canvas = model.initialize_canvas(src_len)
    from elmer_fairseq.canvas import align_targets

    targets, mask, _ = align_targets(sample["target"], canvas, d.pad(), d.eos(), "ignore", "truncate")
    with torch.no_grad():
        policy = EarlyExitGenerator(d).make_policy(model)
        states, _ = model(src, src_len, canvas, policy=policy)
        lprobs = F.log_softmax(model.decoder.off_ramp(states, model.num_exit_layers), -1)
    want = -lprobs[mask].gather(-1, targets[mask][:, None]).sum()
    assert float(log["nll_loss"]) == pytest.approx(float(want), rel=1e-5)


def test_hard_all_layer_loss_scores_each_layers_own_output(task):
    """Naive reference: run the layers, keep every layer's own output y_l for every token, and add
    mean_l CE(off-ramp_l(y_l)) to the exit-layer loss; exited tokens are scored at upper layers too."""
    d = task.target_dictionary
    model = make_model(task, seed=8, early_exit="hard", hard_all_layer_loss=True, model_exit_threshold=2.5)
    sample = make_sample(task, SOURCES, TARGETS)
    loss, _, log = make_criterion(task)(model, sample)
    src, src_len = sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"]
    canvas = model.initialize_canvas(src_len)
    from elmer_fairseq.canvas import align_targets

    targets, mask, _ = align_targets(sample["target"], canvas, d.pad(), d.eos(), "ignore", "truncate")
    dec = model.decoder
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=src_len)
        x = dec.embed(canvas)
        pad = canvas.eq(d.pad())
        exited = pad.t().clone()
        exit_state = torch.zeros_like(x)
        exit_layer = torch.zeros_like(exited, dtype=torch.long)
        own = []
        L = model.num_exit_layers
        for idx, layer in enumerate(dec.layers):
            y, _, _ = layer(x, enc["encoder_out"][0], enc["encoder_padding_mask"][0], self_attn_padding_mask=pad)
            own.append(y)
            lp = F.log_softmax(dec.off_ramp(y, idx + 1), -1)
            ent = -(lp.exp() * lp).sum(-1)
            now = ~exited & ((ent < 2.5) | (idx + 1 == L))
            exit_state[now] = y[now]
            exit_layer[now] = idx + 1
            exited |= now
            x = torch.where(exited[..., None], exit_state, y)
            if bool(exited.all()):
                break
    assert 1 < int(exit_layer.t()[mask].max()) and int(exit_layer.t()[mask].min()) < len(own)  # a mix of exits

    def ce(states_btc, layer):
        lprobs = F.log_softmax(dec.off_ramp(states_btc, layer), -1)
        return -lprobs[mask].gather(-1, targets[mask][:, None]).sum()

    want = ce(exit_state.transpose(0, 1), 1)  # one shared off-ramp: the layer index does not matter
    want = want + sum(ce(y.transpose(0, 1), i + 1) for i, y in enumerate(own)) / len(own)
    assert float(loss) == pytest.approx(float(want), rel=1e-5)


def test_glancing_step_encodes_once_and_matches_two_encoder_passes(task):
    """The glancing pass and the trained pass share one encoder pass; without dropout the loss is the
    one of encoding twice (the previous implementation), with the same glancing draw."""
    model = make_model(task, seed=5, early_exit="soft", soft_gold_prob=0.0)  # dropout 0: deterministic
    sample = make_sample(task, SOURCES, TARGETS)
    crit = make_criterion(task, glat=True, glat_ratio=0.5)
    calls = []
    handle = model.encoder.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(3)
    loss, _, _ = crit(model.train(), sample)
    handle.remove()
    assert len(calls) == 1
    # reference: glance and train each with their own encoder pass
    src, src_len = sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"]
    from elmer_fairseq.canvas import align_targets

    d = task.target_dictionary
    canvas = model.initialize_canvas(src_len)
    targets, mask, _ = align_targets(sample["target"], canvas, d.pad(), d.eos(), model.cfg.post_eos, "truncate")
    torch.manual_seed(3)
    own = {"src_tokens": src, "src_lengths": src_len}
    canvas, mask, _ = crit._glance(model, own, canvas, targets, mask)
    ref, _, _, _ = STRATEGIES["soft"].training_loss(TrainingBatch(
        model=model, net_input=own, canvas=canvas, targets=targets, mask=mask, pad=d.pad(),
        banned=banned_tokens(d), nll=crit._nll))
    assert torch.allclose(loss, ref)


def test_length_calibration_grid_matches_the_generator_and_picks_the_nearest_ratio(task):
    """One pass serves the whole penalty grid: at every penalty, the lengths equal what the generator
    writes with that --eos-penalty (</s> not counted); the choice is the ratio nearest the target."""
    from elmer_fairseq.length_calibration import choose_penalty, length_table, lengths_at_penalties

    model = make_model(task, seed=2, canvas_len_b=4)
    d = task.target_dictionary
    penalties = [0.0, 0.5, 1.0, 2.0, 4.0, 50.0]
    src, src_len = encode(task, SOURCES)
    generator = EarlyExitGenerator(d)
    _, scores, eos_scores, _, pad = generator.position_scores(model, src, src_len)
    grid = lengths_at_penalties(scores, eos_scores, pad, torch.tensor(penalties))
    for row, pen in enumerate(penalties):
        hypos = run_generator(task, model, eos_penalty=pen)
        written = [int(h[0]["tokens"].numel()) - int(h[0]["tokens"][-1] == d.eos()) for h in hypos]
        assert grid[row].tolist() == written, pen
    sample = make_sample(task, SOURCES, TARGETS)
    table = length_table(model, generator, [sample], penalties, d.pad())
    ref = sum(len(t.split()) for t in TARGETS)
    assert all(r == ref for _, r in table.values())
    assert [table[p][0] for p in penalties] == grid.sum(1).tolist()
    chosen = choose_penalty(table, 1.0)
    assert abs(table[chosen][0] / ref - 1) == min(abs(h / ref - 1) for h, _ in table.values())
    assert choose_penalty({0.0: (5, 10), 1.0: (10, 10), 2.0: (10, 10)}) == 1.0  # the smallest on a tie


def test_quantile_calibration_grid_matches_the_generator(task):
    """--rule quantile: at every level of the grid, the calibrated lengths equal what the generator
    writes with --length-rule quantile --length-quantile at that level (</s> not counted), for each
    --post-eos reading; lengths grow with the level; levels outside (0, 1) are refused."""
    from elmer_fairseq.length_calibration import length_table, lengths_at_quantiles

    d = task.target_dictionary
    levels = [0.05, 0.3, 0.5, 0.7, 0.9, 0.999]
    for post_eos in ("eos", "pad", "ignore"):
        model = make_model(task, seed=3, post_eos=post_eos, canvas_len_b=6)
        src, src_len = encode(task, SOURCES)
        generator = EarlyExitGenerator(d)
        _, _, eos_scores, _, pad = generator.position_scores(model, src, src_len)
        grid = lengths_at_quantiles(eos_scores, pad, torch.tensor(levels), post_eos)
        for row, level in enumerate(levels):
            hypos = run_generator(task, model, exit_threshold=0.0, length_rule="quantile", length_quantile=level)
            written = [int(h[0]["tokens"].numel()) - int(h[0]["tokens"][-1] == d.eos()) for h in hypos]
            assert grid[row].tolist() == written, (post_eos, level)
        assert (grid[1:] >= grid[:-1]).all() and grid[-1].sum() > grid[0].sum(), post_eos
        table = length_table(model, generator, [make_sample(task, SOURCES, TARGETS)], levels, d.pad(), rule="quantile")
        assert [table[q][0] for q in levels] == grid.sum(1).tolist()
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="--length-quantile"):
            EarlyExitGenerator(d, length_rule="quantile", length_quantile=bad)


def test_length_calibration_counts_what_collapse_repeats_writes(task):
    """With --collapse-repeats, the calibrated length at each penalty is the length the generator writes
    with that penalty and --collapse-repeats (consecutive equal pieces kept once, </s> not counted)."""
    from elmer_fairseq.length_calibration import counted_lengths, length_table, lengths_at_penalties

    model = make_model(task, seed=2, canvas_len_b=6)
    d = task.target_dictionary
    penalties = [0.0, 1.0, 3.0, 50.0]
    src, src_len = encode(task, SOURCES)
    generator = EarlyExitGenerator(d)
    tokens, scores, eos_scores, _, pad = generator.position_scores(model, src, src_len)
    grid = counted_lengths(tokens, lengths_at_penalties(scores, eos_scores, pad, torch.tensor(penalties)), collapse=True)
    for row, pen in enumerate(penalties):
        hypos = run_generator(task, model, eos_penalty=pen, collapse=True)
        written = [int(h[0]["tokens"].numel()) - int(h[0]["tokens"][-1] == d.eos()) for h in hypos]
        assert grid[row].tolist() == written, pen
    # naive reference for the run count of a prefix
    for b in range(tokens.size(0)):
        for n in range(tokens.size(1) + 1):
            prefix = tokens[b, :n].tolist()
            want = sum(1 for i, t in enumerate(prefix) if i == 0 or t != prefix[i - 1])
            got = counted_lengths(tokens[b:b + 1], torch.tensor([[n]]), collapse=True)
            assert int(got) == want
    table = length_table(model, generator, [make_sample(task, SOURCES, TARGETS)], penalties, d.pad(), collapse=True)
    assert [table[p][0] for p in penalties] == grid.sum(1).tolist()
    assert grid[-1].sum() > 0 and (grid <= lengths_at_penalties(scores, eos_scores, pad, torch.tensor(penalties))).all()


def test_length_calibration_with_no_repeat_neighbours_matches_the_generator(task):
    """--no-repeat-neighbours K: the calibrated length at each penalty is what the generator writes with
    that penalty and the same K."""
    from elmer_fairseq.length_calibration import lengths_at_penalties

    model = make_model(task, seed=5, canvas_len_b=6)
    d = task.target_dictionary
    penalties = [0.0, 0.5, 2.0, 50.0]
    src, src_len = encode(task, SOURCES)
    _, scores, eos_scores, _, pad = EarlyExitGenerator(d, no_repeat_neighbours=3).position_scores(model, src, src_len)
    grid = lengths_at_penalties(scores, eos_scores, pad, torch.tensor(penalties))
    for row, pen in enumerate(penalties):
        hypos = run_generator(task, model, eos_penalty=pen, no_repeat_neighbours=3)
        written = [int(h[0]["tokens"].numel()) - int(h[0]["tokens"][-1] == d.eos()) for h in hypos]
        assert grid[row].tolist() == written, pen


def test_word_lengths_count_what_sentencepiece_post_processing_writes():
    """--unit words: the word count of every prefix (collapsed or not) equals the number of
    whitespace-separated words fairseq's sentencepiece post-processing writes for it."""
    from fairseq.data import Dictionary, data_utils

    from elmer_fairseq.length_calibration import WordMarks, counted_lengths

    d = Dictionary()
    for sym in ["\u2581lib", "rary", "\u2581for", "\u2581C", "++", "\u2581", "(", "\u2581data", "s", "\u2581\u2581"]:
        d.add_symbol(sym)
    marks = WordMarks(d)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(d.nspecial, len(d), (40, 7), generator=gen)
    tokens[:5, 1:4] = tokens[:5, :1]  # repeats
    for collapse in (False, True):
        for n in range(8):
            lengths = torch.full((1, 40), n)
            got = counted_lengths(tokens, lengths, collapse=collapse, marks=marks)[0].tolist()
            want = []
            for row in tokens[:, :n].tolist():
                if collapse:
                    row = [t for i, t in enumerate(row) if i == 0 or t != row[i - 1]]
                text = data_utils.post_process(" ".join(d[t] for t in row), "sentencepiece")
                want.append(len(text.split()))
            assert got == want, (collapse, n)
    plain = Dictionary()
    plain.add_symbol("cat")
    with pytest.raises(ValueError, match="--unit pieces"):
        WordMarks(plain)
