"""The strategy registry: one class serves the criterion, the generator and GLAT."""

import pytest
import torch
import torch.nn.functional as F

from helpers import make_model, make_sample
from naive_decoder import naive_decode
from elmer_fairseq.early_exit_generator import EarlyExitGenerator
from elmer_fairseq.exit_policies import EntropyExit
from elmer_fairseq.exit_strategies import STRATEGIES, ExitStrategy, LPLMStrategy, sample_exit_layers, strategy_of
from elmer_fairseq.lplm_criterion import LPLMCriterion

SOURCES = ["a b c d", "e f g", "b c"]
TARGETS = ["x y z", "y z", "z x y w"]


class FirstLayer(ExitStrategy):
    """A throwaway strategy: every token is trained and read at layer 1."""

    name = "first-layer"

    def generation_policy(self, model_cfg, threshold=None, banned=(), eos=None):
        return EntropyExit(float("inf"), banned=banned, eos=eos)  # every entropy is below +inf

    def training_loss(self, batch):
        ones = torch.ones(batch.canvas.shape, dtype=torch.long, device=batch.canvas.device)
        return LPLMStrategy().training_loss(
            type(batch)(**{**batch.__dict__, "exit_layers": ones, "samples": 1})
        )


def test_a_strategy_added_in_the_registry_serves_training_and_generation(task, monkeypatch):
    monkeypatch.setitem(STRATEGIES, FirstLayer.name, FirstLayer())
    model = make_model(task, seed=1)
    model.cfg.early_exit = FirstLayer.name
    sample = make_sample(task, SOURCES, TARGETS)
    crit = LPLMCriterion(task)
    loss, sample_size, log = crit(model, sample)
    # independent reference: the naive per-token decoder with every exit layer 1, read at off-ramp 1
    src, src_len = sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"]
    canvas = model.initialize_canvas(src_len)
    with torch.no_grad():
        _, states = naive_decode(model, src, src_len, canvas, torch.ones_like(canvas))
        logits = model.decoder.off_ramp(states[1].transpose(0, 1), 1)
    d = task.target_dictionary
    target = sample["target"]
    n = min(target.size(1), canvas.size(1))
    keep = target[:, :n].ne(d.pad())
    ref = F.nll_loss(F.log_softmax(logits[:, :n][keep], -1), target[:, :n][keep], reduction="sum")
    assert torch.allclose(log["nll_loss"], ref, atol=1e-4)
    # generation: every token exits at layer 1 and reads off-ramp 1
    hypos = EarlyExitGenerator(d).generate([model], sample)
    for h in hypos:
        assert set(h[0]["exit_layers"].tolist()) == {1}


def test_strategy_of_names_the_flag_for_an_unknown_strategy(task):
    model = make_model(task)
    model.cfg.early_exit = "nope"
    with pytest.raises(ValueError, match="--early-exit must be one of lplm, hard, soft, got 'nope'"):
        strategy_of(model.cfg)


def test_exit_layer_sampler_is_uniform_over_every_layer_and_draws_differ():
    """Eq. 9 draws each token's exit layer uniformly from 1..L; the k draws of one sentence are
    independent (not one row repeated)."""
    L, k = 6, 4
    canvas = torch.zeros(500, 20, dtype=torch.long)
    draws = sample_exit_layers(canvas, L, k, torch.Generator().manual_seed(0))
    assert draws.shape == (500 * k, 20)
    assert draws.min() == 1 and draws.max() == L
    freq = torch.bincount(draws.flatten(), minlength=L + 1)[1:].float() / draws.numel()
    # 40,000 draws: the standard error of a share near 1/6 is 0.0019; allow 4 of them
    assert torch.all((freq - 1 / L).abs() < 0.0075), freq
    rows = draws.view(500, k, 20)
    same = (rows[:, 1:] == rows[:, :1]).all(-1)  # a later draw equal to the first in all 20 positions
    assert not same.any()
