"""The one-pass generator: cut at the first </s>, independence from the reference, over-fitting."""

import pytest
import torch

from helpers import encode, make_model, make_sample
from elmer_fairseq.early_exit_generator import EarlyExitGenerator, cut_at_first_eos
from elmer_fairseq.lplm_criterion import LPLMCriterion


def naive_cut(row, eos, pad):
    out = 0
    for tok in row:
        if tok == pad:
            return out
        out += 1
        if tok == eos:
            return out
    return out


def test_cut_at_first_eos_matches_naive_loop():
    eos, pad = 2, 1
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 6, (200, 9), generator=gen)
    lengths = cut_at_first_eos(tokens, eos, pad)
    assert lengths.tolist() == [naive_cut(r.tolist(), eos, pad) for r in tokens]


def test_generator_cuts_at_first_eos(task, monkeypatch):
    """Rig the decoder so it predicts 'cat dog </s> red </s>': the hypothesis is 'cat dog </s>'."""
    d = task.target_dictionary
    model = make_model(task, canvas_len_a=0.0, canvas_len_b=5)
    wanted = torch.tensor([d.index("cat"), d.index("dog"), d.eos(), d.index("red"), d.eos()])

    def rigged(states, layer):
        logits = torch.zeros(states.shape[:-1] + (len(d),))
        logits[..., :] = -10.0
        logits.scatter_(-1, wanted.expand(states.shape[:-1])[..., None], 10.0)
        return torch.log_softmax(logits, -1)

    monkeypatch.setattr(model.decoder, "off_ramp", rigged)
    sample = make_sample(task, ["the cat sat on the mat"], ["cat"])
    hypo = EarlyExitGenerator(d).generate([model], sample)[0][0]
    assert hypo["tokens"].tolist() == wanted[:3].tolist()
    assert hypo["positional_scores"].shape == (3,)
    assert d.string(hypo["tokens"]) == "cat dog"


def test_generation_ignores_the_reference(task):
    model = make_model(task)
    sources = ["the cat sat on the mat", "a dog ran"]
    gen = EarlyExitGenerator(task.target_dictionary)
    short = gen.generate([model], make_sample(task, sources, ["cat", "dog"]))
    long = gen.generate([model], make_sample(task, sources, ["cat sat on a big red mat under the tree", "a"]))
    src, src_len = encode(task, sources)
    canvas = model.initialize_canvas(src_len)
    assert canvas.ne(task.target_dictionary.pad()).sum(1).tolist() == [7 + 2, 4 + 2]  # a=1, b=2
    for a, b in zip(short, long):
        assert torch.equal(a[0]["tokens"], b[0]["tokens"])


def test_entropy_generator_threshold_zero_equals_last_layer(task):
    model = make_model(task)
    sample = make_sample(task, ["the cat sat on the mat", "a dog ran"], ["x", "y"])
    last = EarlyExitGenerator(task.target_dictionary).generate([model], sample)
    hard0 = EarlyExitGenerator(task.target_dictionary, exit_threshold=1e-12).generate([model], sample)
    for a, b in zip(last, hard0):
        assert torch.equal(a[0]["tokens"], b[0]["tokens"])
        torch.testing.assert_close(a[0]["positional_scores"], b[0]["positional_scores"])


def test_tiny_model_overfits_a_handful_of_pairs(task):
    pairs = [
        ("the cat sat on the mat", "cat sat"),
        ("a dog ran under the tree", "dog ran under tree"),
        ("the big red dog", "red dog"),
        ("a small blue cat ran fast", "small cat ran fast"),
        ("the slow dog sat", "slow dog"),
        ("a tree on a mat", "tree on mat"),
    ]
    model = make_model(task, canvas_len_a=0.0, canvas_len_b=6, decoder_layers=3, encoder_embed_dim=32,
                       decoder_embed_dim=32, encoder_ffn_embed_dim=64, decoder_ffn_embed_dim=64)
    sample = make_sample(task, [p[0] for p in pairs], [p[1] for p in pairs])
    crit = LPLMCriterion(task, lplm_samples=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    torch.manual_seed(0)
    first = None
    for _ in range(300):
        loss, size, _ = crit(model, sample)
        opt.zero_grad()
        (loss / size).backward()
        opt.step()
        first = first if first is not None else loss.item() / size
    model.eval()
    final = crit(model, sample)[0].item() / size
    assert final < 0.05 * first
    hypos = EarlyExitGenerator(task.target_dictionary).generate([model], sample)
    assert [task.target_dictionary.string(h[0]["tokens"]) for h in hypos] == [p[1] for p in pairs]


def test_checkpoint_of_another_dictionary_is_refused_by_name(task):
    from helpers import make_task

    model = make_model(task)
    other = make_model(make_task(["x", "y", "z"]))
    with pytest.raises(ValueError, match="another dictionary"):
        other.load_state_dict(model.state_dict())


def test_generator_refuses_a_model_of_another_architecture(task):
    sample = make_sample(task, ["the cat"], ["cat"])
    with pytest.raises(TypeError, match="elmer_nat"):
        EarlyExitGenerator(task.target_dictionary).generate([torch.nn.Linear(2, 2)], sample)


def test_best_tokens_equals_log_softmax_then_ban_then_max():
    from elmer_fairseq.early_exit_generator import best_tokens
    from elmer_fairseq.exit_policies import ban_tokens

    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0)) * 4
    logits[0, 0, 2] = 50.0  # a banned token that would win
    ref_scores, ref_tokens = ban_tokens(torch.log_softmax(logits, -1), [1, 2]).max(-1)
    scores, tokens = best_tokens(logits.clone(), [1, 2])
    assert torch.equal(tokens, ref_tokens) and not tokens.eq(2).any()
    assert torch.allclose(scores, ref_scores, atol=1e-5)


def test_compile_path_matches_the_plain_generator(task, monkeypatch):
    """--compile runs encoder + decoder + last off-ramp as one compiled function; its hypotheses must
    equal the plain generator's. (Compiled with dynamo's eager backend here: CI tests the wiring,
    scripts/benchmark.py --compile measures inductor.)"""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", dynamic=True))
    model = make_model(task)
    sample = make_sample(task, ["the cat sat on the mat", "a dog ran"], ["cat", "dog"])
    d = task.target_dictionary
    plain = EarlyExitGenerator(d, exit_threshold=0.0).generate([model], sample)
    compiled_gen = EarlyExitGenerator(d, exit_threshold=0.0, compile=True)
    compiled = compiled_gen.generate([model], sample)
    assert len(compiled_gen._compiled) == 1
    for a, b in zip(plain, compiled):
        assert torch.equal(a[0]["tokens"], b[0]["tokens"])
        assert torch.equal(a[0]["exit_layers"], b[0]["exit_layers"])
        assert torch.allclose(a[0]["positional_scores"], b[0]["positional_scores"], atol=1e-6)


def naive_distinct_neighbours(cand, scores, valid):
    """One position and one round at a time: where two valid neighbours write the same token, the
    less confident (the later on a tie) moves to its next candidate."""
    batch, width, k = len(cand), len(cand[0]), len(cand[0][0])
    choice = [[0] * width for _ in range(batch)]
    for _ in range(k - 1):
        moves = set()
        for b in range(batch):
            tok = [cand[b][i][choice[b][i]] for i in range(width)]
            sc = [scores[b][i][choice[b][i]] for i in range(width)]
            for i in range(width - 1):
                if valid[b][i] and valid[b][i + 1] and tok[i] == tok[i + 1]:
                    moves.add((b, i + 1) if sc[i + 1] <= sc[i] else (b, i))
        for b, i in moves:
            choice[b][i] = min(choice[b][i] + 1, k - 1)
    return [[cand[b][i][choice[b][i]] for i in range(width)] for b in range(batch)]


def test_distinct_neighbours_by_hand():
    from elmer_fairseq.early_exit_generator import distinct_neighbours

    cand = torch.tensor([[[5, 6], [5, 7], [5, 8], [9, 5], [9, 4]]])
    scores = torch.tensor([[[-0.1, -2.0], [-0.5, -1.0], [-0.2, -3.0], [-0.3, -0.4], [-0.1, -0.2]]])
    valid = torch.tensor([[True, True, True, True, False]])  # the last slot is padding: its 9 may stay
    tokens, chosen = distinct_neighbours(cand, scores, valid)
    # 5 5 5: the middle one is the least confident of both pairs, so it alone moves (to 7)
    assert tokens.tolist() == [[5, 7, 5, 9, 9]]
    assert torch.equal(chosen, torch.tensor([[-0.1, -1.0, -0.2, -0.3, -0.1]]))


def test_distinct_neighbours_matches_a_naive_loop():
    from elmer_fairseq.early_exit_generator import distinct_neighbours

    gen = torch.Generator().manual_seed(0)
    batch, width, k = 64, 9, 4
    # few distinct tokens, so that neighbours often agree; each position's candidates distinct
    cand = torch.stack([torch.randperm(6, generator=gen)[:k] for _ in range(batch * width)]).view(batch, width, k)
    scores = torch.rand(batch, width, k, generator=gen).sort(-1, descending=True).values.log()
    scores[:5] = scores[:5].round(decimals=1)  # ties
    valid = torch.arange(width)[None, :] < torch.randint(1, width + 1, (batch, 1), generator=gen)
    tokens, chosen = distinct_neighbours(cand, scores, valid)
    assert tokens.tolist() == naive_distinct_neighbours(cand.tolist(), scores.tolist(), valid.tolist())
    assert torch.equal(chosen, scores.gather(2, (cand == tokens[..., None]).float().argmax(-1, keepdim=True)).squeeze(2))


def test_no_repeat_neighbours_in_the_generator_against_a_naive_reading(task):
    """--no-repeat-neighbours K: the K best tokens (</s> and the banned ones excluded) of the last layer
    at each position, chosen as the naive loop does, then </s> where it beats the chosen token."""
    import math

    from elmer_fairseq.exit_policies import banned_tokens

    model = make_model(task, seed=3, canvas_len_b=8)
    d = task.target_dictionary
    sources = ["the cat sat on the mat", "a dog ran", "big red tree"]
    src, src_len = encode(task, sources)
    sample = {"net_input": {"src_tokens": src, "src_lengths": src_len}, "id": torch.arange(3)}
    k = 3
    hypos = EarlyExitGenerator(d, exit_threshold=0.0, no_repeat_neighbours=k).generate([model], sample)
    canvas = model.initialize_canvas(src_len)
    with torch.no_grad():
        states, _ = model(src, src_len, canvas)
        lprobs = torch.log_softmax(model.decoder.off_ramp(states, model.num_exit_layers), -1)
    ranked = lprobs.clone()
    ranked[..., banned_tokens(d) + [d.eos()]] = -math.inf
    top_scores, top_tokens = ranked.topk(k, -1)
    valid = canvas.ne(d.pad())
    chosen = naive_distinct_neighbours(top_tokens.tolist(), top_scores.tolist(), valid.tolist())
    plain = EarlyExitGenerator(d, exit_threshold=0.0).generate([model], sample)
    changed = 0
    for b, nbest in enumerate(hypos):
        want = []
        for i in range(int(valid[b].sum())):
            tok = chosen[b][i]
            if lprobs[b, i, d.eos()] > lprobs[b, i, tok]:
                want.append(d.eos())
                break
            want.append(tok)
        assert nbest[0]["tokens"].tolist() == want
        changed += nbest[0]["tokens"].tolist() != plain[b][0]["tokens"].tolist()
    assert changed  # the untrained model repeats: the rule changed something


def test_no_repeat_neighbours_refuses_hard_exit_and_k_one(task):
    model = make_model(task)
    src, src_len = encode(task, ["a dog ran"])
    sample = {"net_input": {"src_tokens": src, "src_lengths": src_len}, "id": torch.arange(1)}
    with pytest.raises(ValueError, match="--no-repeat-neighbours"):
        EarlyExitGenerator(task.target_dictionary, exit_threshold=0.5, no_repeat_neighbours=3).generate([model], sample)
    with pytest.raises(ValueError, match="--no-repeat-neighbours must be 0"):
        EarlyExitGenerator(task.target_dictionary, no_repeat_neighbours=1)


@pytest.mark.parametrize("strategy,ctc", [("soft", False), ("soft", True), ("lplm", False)])
def test_bf16_generation_is_the_model_cast_to_bf16(task, strategy, ctc):
    """--bf16-generation: the generator casts the model to bfloat16 at its first batch, in place; its
    hypotheses are those of a bf16 copy cast by hand and read by the plain generator, scores in fp32."""
    import copy

    model = make_model(task, early_exit=strategy, ctc=ctc, canvas_len_a=2.0)
    by_hand = copy.deepcopy(model).to(torch.bfloat16)
    sample = make_sample(task, ["the cat sat on the mat", "a dog ran"], ["cat", "dog"])
    d = task.target_dictionary
    fp32 = EarlyExitGenerator(d).generate([model], sample)
    want = EarlyExitGenerator(d).generate([by_hand], sample)
    got = EarlyExitGenerator(d, bf16=True).generate([model], sample)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for a, b in zip(want, got):
        assert torch.equal(a[0]["tokens"], b[0]["tokens"])
        assert b[0]["positional_scores"].dtype == torch.float32
        assert torch.equal(a[0]["positional_scores"], b[0]["positional_scores"])
    # bf16 is not a no-op: the scores move off the fp32 model's
    assert any(not torch.equal(a[0]["positional_scores"], b[0]["positional_scores"]) for a, b in zip(fp32, got)
               if torch.equal(a[0]["tokens"], b[0]["tokens"]))
