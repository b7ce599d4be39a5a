"""--ctc: the loss, the alignment and the reading of the canvas against brute-force enumeration of
every labelling, and the criterion, GLAT and the generator against naive references."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import make_model, make_sample
from elmer_fairseq.ctc import collapse, ctc_loss, ctc_targets, feasible, viterbi_alignment
from elmer_fairseq.early_exit_generator import EarlyExitGenerator
from elmer_fairseq.exit_policies import banned_tokens
from elmer_fairseq.lplm_criterion import LPLMCriterion

SOURCES = ["the cat sat on the mat", "a dog ran", "big red tree"]
TARGETS = ["cat sat", "dog dog ran", "tree"]
BLANK = 0


def read(path, blank=BLANK):
    """CTC's reading of one labelling, one position at a time."""
    out, prev = [], None
    for label in path:
        if label != prev and label != blank:
            out.append(label)
        prev = label
    return out


def brute_force(lprobs, target, length):
    """(log P(target), best path) over every labelling of the first ``length`` positions."""
    V = lprobs.size(-1)
    total, best, best_path = -math.inf, -math.inf, None
    for path in itertools.product(range(V), repeat=length):
        if read(path) != target:
            continue
        score = sum(float(lprobs[t, label]) for t, label in enumerate(path))
        total = float(torch.logaddexp(torch.tensor(total), torch.tensor(score)))
        if score > best:
            best, best_path = score, list(path)
    return total, best_path


def case():
    gen = torch.Generator().manual_seed(3)
    T, B, V = 5, 4, 4
    logits = torch.randn(T, B, V, generator=gen) * 2
    targets = torch.tensor([[1, 2, 0], [3, 3, 0], [2, 0, 0], [1, 2, 3]])  # 0 pads past each length
    target_lengths = torch.tensor([2, 2, 1, 3])
    input_lengths = torch.tensor([5, 4, 3, 5])
    return logits, targets, target_lengths, input_lengths


def test_ctc_loss_and_alignment_against_every_labelling():
    logits, targets, target_lengths, input_lengths = case()
    lprobs = torch.log_softmax(logits, -1)
    loss, nll, ok = ctc_loss(logits, targets, target_lengths, input_lengths, BLANK)
    alignment = viterbi_alignment(lprobs.transpose(0, 1), targets, target_lengths, input_lengths, BLANK)
    want_total = 0.0
    for b in range(4):
        n, y = int(input_lengths[b]), targets[b, : target_lengths[b]].tolist()
        log_p, path = brute_force(lprobs[:n, b], y, n)
        want_total += -log_p
        assert alignment[b, :n].tolist() == path
        assert (alignment[b, n:] == BLANK).all()
    assert ok.all()
    assert float(nll) == pytest.approx(want_total, rel=1e-5) and float(loss) == float(nll)


def test_label_smoothing_weighs_each_reference_token_like_fairseq():
    logits, targets, target_lengths, input_lengths = case()
    eps = 0.1
    loss, nll, _ = ctc_loss(logits, targets, target_lengths, input_lengths, BLANK, eps)
    lprobs = torch.log_softmax(logits, -1)
    smooth = 0.0
    for b in range(4):
        n = int(input_lengths[b])
        per_position = [-float(lprobs[t, b].mean()) for t in range(n)]
        smooth += sum(per_position) / n * int(target_lengths[b])
    assert float(loss) == pytest.approx((1 - eps) * float(nll) + eps * smooth, rel=1e-5)


def test_a_reference_without_a_path_is_counted_and_adds_nothing():
    logits, _, _, _ = case()
    targets = torch.tensor([[1, 1, 1], [1, 2, 0]])
    target_lengths, input_lengths = torch.tensor([3, 2]), torch.tensor([4, 2])  # 1 _ 1 _ 1 needs 5
    assert feasible(targets, target_lengths, input_lengths).tolist() == [False, True]
    lp = torch.log_softmax(logits[:, :2], -1)
    loss, nll, ok = ctc_loss(logits[:, :2], targets, target_lengths, input_lengths, BLANK)
    assert ok.tolist() == [False, True]
    assert float(nll) == pytest.approx(-brute_force(lp[:2, 1], [1, 2], 2)[0], rel=1e-5)
    alignment = viterbi_alignment(lp.transpose(0, 1), targets, target_lengths, input_lengths, BLANK)
    assert alignment[0].tolist() == [BLANK] * 5 and alignment[1, :2].tolist() == [1, 2]


def test_collapse_reads_every_row_as_the_naive_loop():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 3, (6, 9), generator=gen)
    scores = torch.randn(6, 9, generator=gen)
    lengths = torch.tensor([9, 7, 1, 0, 5, 9])
    valid = torch.arange(9)[None, :] < lengths[:, None]
    out, out_scores, n, marks = collapse(tokens, scores, valid, BLANK, tokens * 10)
    for b in range(6):
        row = tokens[b, : lengths[b]].tolist()
        want = read(row)
        firsts = [t for t in range(len(row)) if row[t] != BLANK and (t == 0 or row[t] != row[t - 1])]
        assert int(n[b]) == len(want) and out[b, : n[b]].tolist() == want
        assert out_scores[b, : n[b]].tolist() == [float(scores[b, t]) for t in firsts]
        assert marks[b, : n[b]].tolist() == [10 * w for w in want]


def test_ctc_targets_drop_eos_and_padding(task):
    d = task.target_dictionary
    sample = make_sample(task, SOURCES, TARGETS)
    targets, lengths = ctc_targets(sample["target"], d.pad(), d.eos())
    for b, line in enumerate(TARGETS):
        assert targets[b, : lengths[b]].tolist() == [d.index(w) for w in line.split()]
        assert (targets[b, lengths[b]:] == d.pad()).all()


def ctc_model(task, strategy, **kw):
    return make_model(task, seed=11, early_exit=strategy, ctc=True, canvas_len_a=0.0, canvas_len_b=7,
                      model_exit_threshold=1.0, decoder_layers=3, **kw)


def model_log_probs(model, sample, policy):
    """The canvas's log-probabilities (T, B, V), each position at its exit layer, computed here."""
    net = sample["net_input"]
    canvas = model.initialize_canvas(net["src_lengths"])
    states, extra = model(net["src_tokens"], net["src_lengths"], canvas, policy=policy)
    layers = extra["exit_layers"].clamp(min=1)
    logits = torch.stack([model.decoder.off_ramp(states[b], 1) if len(model.decoder.off_ramps) == 1 else
                          torch.stack([model.decoder.off_ramp(states[b, t], int(layers[b, t]))
                                       for t in range(canvas.size(1))]) for b in range(canvas.size(0))])
    return torch.log_softmax(logits, -1).transpose(0, 1), canvas


@pytest.mark.parametrize("strategy", ["lplm", "hard", "soft"])
def test_criterion_loss_is_the_ctc_loss_of_the_models_canvas(task, strategy):
    """In eval mode (no gold mixing, no glancing) and with the exit layers fixed for lplm: the
    criterion's nll is -log P(y | x) of the last (lplm: assigned) layer, summed per sentence."""
    d = task.target_dictionary
    model = ctc_model(task, strategy)
    sample = make_sample(task, SOURCES, TARGETS)
    crit = LPLMCriterion(task)
    if strategy == "lplm":
        layers = torch.randint(1, 4, (3, 7), generator=torch.Generator().manual_seed(0))
        _, size, log = crit(model, sample, exit_layers=layers)
        from elmer_fairseq.exit_policies import AssignedExit

        policy = AssignedExit(layers)
    else:
        _, size, log = crit(model, sample)
        policy = EarlyExitGenerator(d).make_policy(model)
    with torch.no_grad():
        lprobs, canvas = model_log_probs(model, sample, policy)
    want = 0.0
    for b, line in enumerate(TARGETS):
        y = torch.tensor([[d.index(w) for w in line.split()]])
        want += float(F.ctc_loss(lprobs[:, b: b + 1], y, torch.tensor([7]), torch.tensor([y.size(1)]),
                                 blank=d.index("<mask>"), reduction="sum"))
    assert float(log["nll_loss"]) == pytest.approx(want, rel=1e-4)
    assert int(size) == sum(len(line.split()) for line in TARGETS) and int(log["long_targets"]) == 0


@pytest.mark.parametrize("strategy", ["lplm", "hard", "soft"])
def test_ctc_trains_every_strategy_with_glancing(task, strategy):
    model = ctc_model(task, strategy).train()
    crit = LPLMCriterion(task, glat=True, glat_ratio=0.5, label_smoothing=0.1)
    torch.manual_seed(2)
    loss, _, log = crit(model, make_sample(task, SOURCES, TARGETS))
    loss.backward()
    assert torch.isfinite(loss) and model.decoder.layers[0].fc1.weight.grad.abs().sum() > 0
    assert "glat_revealed" in log


def test_glancing_under_ctc_reveals_the_alignment(task):
    """The revealed positions carry the Viterbi alignment's tokens (never a blank), ratio x d of
    them, d counting the canvas positions whose prediction differs from the alignment."""
    d = task.target_dictionary
    blank = d.index("<mask>")
    model = ctc_model(task, "soft")
    sample = make_sample(task, SOURCES, TARGETS)
    net = dict(sample["net_input"])
    canvas = model.initialize_canvas(net["src_lengths"])
    reference, lengths = ctc_targets(sample["target"], d.pad(), d.eos())
    slots = canvas.ne(d.pad())
    crit = LPLMCriterion(task, glat=True, glat_ratio=0.5)
    torch.manual_seed(0)
    new_canvas, alignment, revealed = crit._glance_ctc(model, net, canvas, reference, lengths, slots.sum(1),
                                                       torch.ones(3, dtype=torch.bool), blank)
    with torch.no_grad():
        lprobs, _ = model_log_probs(model, sample, EarlyExitGenerator(d).make_policy(model))
    for b, line in enumerate(TARGETS):
        y = [d.index(w) for w in line.split()]
        allowed = lprobs[:, b].clone()
        allowed[:, banned_tokens(d, ctc=True)] = -math.inf
        pred = allowed.argmax(-1).tolist()
        # the most probable path, by enumeration over the labels the path may use
        labels = sorted(set(y) | {blank})
        best, path = -math.inf, None
        for cand in itertools.product(labels, repeat=7):
            if read(cand, blank) == y:
                score = sum(float(lprobs[t, b, c]) for t, c in enumerate(cand))
                if score > best:
                    best, path = score, list(cand)
        assert alignment[b].tolist() == path
        wrong = sum(int(pred[t] != path[t]) for t in range(7))
        assert int(revealed[b].sum()) == min(int(wrong * 0.5), sum(int(c != blank) for c in path))
        for t in range(7):
            assert new_canvas[b, t] == (path[t] if revealed[b, t] else canvas[b, t])
            assert not revealed[b, t] or path[t] != blank


@pytest.mark.parametrize("strategy", ["lplm", "hard", "soft"])
@pytest.mark.parametrize("penalty", [0.0, 1.5])
def test_generator_reads_the_canvas_as_ctc(task, strategy, penalty):
    """Each position writes its best token, the blank only where log p(blank) - --blank-penalty still
    beats every other token; then repeats merged and blanks dropped (the naive reading)."""
    d = task.target_dictionary
    model = ctc_model(task, strategy)
    with torch.no_grad():  # make the blank and "cat" likely, so that merging and dropping both happen
        model.decoder.embed_tokens.weight[d.index("<mask>")] *= 3
    sample = make_sample(task, SOURCES, TARGETS)
    gen = EarlyExitGenerator(d, blank_penalty=penalty)
    hypos = gen.generate([model], sample)
    with torch.no_grad():
        lprobs, _ = model_log_probs(model, sample, gen.make_policy(model))
    blank, merged, blanks = d.index("<mask>"), 0, 0
    for b in range(3):
        allowed = lprobs[:, b].clone()
        allowed[:, banned_tokens(d, ctc=True)] = -math.inf
        allowed[:, blank] -= penalty
        path = allowed.argmax(-1).tolist()
        want = read(path, blank)
        merged += len([t for t in range(1, 7) if path[t] == path[t - 1] != blank])
        blanks += path.count(blank)
        assert hypos[b][0]["tokens"].tolist() == want + [d.eos()]
    assert merged > 0 and (blanks > 0 or penalty > 0)  # without a penalty the reading did both of its steps


def test_blank_penalty_calibration_grid_matches_the_generator(task):
    """length_calibration --rule blank-penalty: at every penalty of the grid the counted output length
    is what the generator writes with that --blank-penalty (</s> not counted);
    the generator refuses a blank penalty for a model without --ctc."""
    from elmer_fairseq.length_calibration import length_table

    d = task.target_dictionary
    model = ctc_model(task, "soft")
    with torch.no_grad():
        model.decoder.embed_tokens.weight[d.index("<mask>")] *= 3
    sample = make_sample(task, SOURCES, TARGETS)
    penalties = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    table = length_table(model, EarlyExitGenerator(d), [sample], penalties, d.pad(), rule="blank-penalty")
    written = []
    for penalty in penalties:
        hypos = EarlyExitGenerator(d, blank_penalty=penalty).generate([model], sample)
        written.append(sum(int(h[0]["tokens"].numel()) - 1 for h in hypos))
    assert [table[p][0] for p in penalties] == written
    assert len(set(written)) > 1  # the penalty moved the lengths (not always up: fewer blanks merge more repeats)
    with pytest.raises(ValueError, match="--blank-penalty 1 applies to a model trained with --ctc only"):
        EarlyExitGenerator(d, blank_penalty=1.0).generate([make_model(task)], sample)


def test_ctc_refuses_what_moves_an_end(task):
    d = task.target_dictionary
    model = ctc_model(task, "soft")
    sample = make_sample(task, SOURCES, TARGETS)
    for kw, flag in ((dict(length_rule="median"), "--length-rule median"), (dict(eos_penalty=1.0), "--eos-penalty"),
                     (dict(no_repeat_neighbours=4), "--no-repeat-neighbours 4")):
        with pytest.raises(ValueError, match=flag):
            EarlyExitGenerator(d, **kw).generate([model], sample)
    with pytest.raises(ValueError, match="--post-eos pad does not apply with --ctc"):
        make_model(task, ctc=True, post_eos="pad")
