"""Exit strategies: what ``--early-exit`` names, in one place.

A strategy is how a model is trained and read (paper §4): which exit policy
(``exit_policies.py``) one-pass generation uses, and how the training loss is
taken. The criterion, the generator (and through it the Python API and
``elmer-calibrate-length``) and GLAT's first pass all ask ``strategy_of(cfg)``;
nothing else branches on the strategy's name. Adding a strategy is a subclass
of ``ExitStrategy`` here and one line in ``STRATEGIES``.

- ``lplm``: every token's exit layer is drawn uniformly from 1..L in training
  (Layer Permutation LM, Eq. 9); generation reads the last layer unless
  ``--exit-threshold`` asks for hard exit.
- ``hard``: hard early exit in training and generation (Eq. 10): a token exits
  at the first layer whose off-ramp entropy is below δ.
- ``soft``: soft early exit (Eq. 11-12): the argmax of every layer's off-ramp is
  embedded and mixed into the next layer's input; read at the last layer.
"""

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from .exit_policies import EntropyExit, ExitPolicy, LastLayerExit, SoftExit


@dataclass
class TrainingBatch:
    """What a strategy's training pass gets from the criterion.

    ``canvas``/``targets``/``mask`` are (B, T): the decoder input, the aligned
    reference and the trained positions. ``nll(logits, target, weight=None)``
    returns the (label-smoothed loss, nll loss) sums, over the positions of
    weight 1 if a 0/1 ``weight`` is given (``lplm_criterion.smoothed_nll``). ``exit_layers`` (k*B, T) fixes LPLM's
    draw (tests); ``samples`` is ``--lplm-samples``.

    ``sequence_loss`` (``--ctc``): the loss is not per position but of the whole canvas, a function of
    its logits (T, B, V) returning (loss, nll); ``mask`` then marks every canvas slot and ``targets``
    holds no reference. ``gold``/``gold_mask`` (B, T): the tokens soft exit may feed upward in
    training (``--soft-gold-prob``); by default ``targets``/``mask``, under ``--ctc`` the reference's
    alignment if one was computed (GLAT), else None. Strategies score through ``score_exit_states``,
    ``score_rows`` and ``score_canvas``, which serve both.
    """

    model: torch.nn.Module
    net_input: dict
    canvas: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    pad: int
    banned: list
    nll: Callable
    samples: int = 1
    exit_layers: Optional[torch.Tensor] = None
    sequence_loss: Optional[Callable] = None
    gold: Optional[torch.Tensor] = None
    gold_mask: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.sequence_loss is None and self.gold is None:
            self.gold, self.gold_mask = self.targets, self.mask

    def score_rows(self, logits):
        """(loss, nll) of ``logits`` (N, V) of the positions ``mask`` marks, in (B, T) row-major order."""
        if self.sequence_loss is None:
            return self.nll(logits, self.targets[self.mask])
        full = logits.new_zeros(self.mask.shape + logits.shape[-1:])
        full[self.mask] = logits
        return self.sequence_loss(full.transpose(0, 1))

    def score_exit_states(self, decoder, states, layers):
        """(loss, nll) of the exit states ``states`` (B, T, C), each read at its exit layer ``layers``
        (B, T, in 1..L; any value at padding), or all at the one layer ``layers`` (an int: one off-ramp,
        no per-layer selection). Per-position losses project the positions ``mask`` marks; a sequence loss
        (``--ctc``, where ``mask`` is every canvas slot) projects the canvas where it lies, (T, B, V),
        instead of scattering the slots' logits into a zero tensor of that size (a padding slot's exit
        state is zero, as its scattered logits were)."""
        def project(x, select):
            if isinstance(layers, int):
                return decoder.off_ramp(x, layers)
            return decoder.project(x, select(layers).clamp(min=1))

        if self.sequence_loss is None:
            return self.score_rows(project(states[self.mask], lambda t: t[self.mask]))
        flat = states.transpose(0, 1).reshape(-1, states.size(-1))
        logits = project(flat, lambda t: t.t().reshape(-1))
        return self.sequence_loss(logits.view(states.size(1), states.size(0), -1))

    def score_canvas(self, logits):
        """(loss, nll) of ``logits`` (T, B, V) of the whole canvas, read at the positions ``mask`` marks."""
        if self.sequence_loss is None:
            return self.nll(logits, self.targets.t(), self.mask.t())
        return self.sequence_loss(logits)


def sample_exit_layers(canvas, num_layers: int, k: int, generator=None):
    """k independent uniform draws of an exit layer in 1..L per position: (k*B, T), rows grouped per sentence."""
    rows = canvas.size(0) * k
    return torch.randint(1, num_layers + 1, (rows, canvas.size(1)), device=canvas.device, generator=generator)


def check_threshold(threshold):
    if threshold is not None and threshold < 0:
        raise ValueError(f"--exit-threshold must be >= 0, got {threshold}")


class ExitStrategy:
    """One ``--early-exit`` choice. Capability flags: ``soft_mix``, the decoder
    builds the soft-mix layers W_l of Eq. 11; ``samples``, ``--lplm-samples k``
    applies (k exit-layer draws per sequence)."""

    name = ""
    help = ""  # one clause of --early-exit's help text
    soft_mix = False
    samples = False

    def generation_policy(self, model_cfg, threshold=None, banned=(), eos=None) -> ExitPolicy:
        """The exit rule of one-pass generation. ``threshold``: ``--exit-threshold`` δ, None for the
        strategy's own rule; δ > 0 is hard exit (Eq. 10), 0 the last layer."""
        check_threshold(threshold)
        if threshold:
            return EntropyExit(threshold, banned=banned, eos=eos)
        return LastLayerExit()

    def training_loss(self, batch: TrainingBatch):
        """(loss, nll_loss, exit layer of every trained token (N,), k): k is the number of exit-layer
        draws per sequence the sums run over (the criterion divides by it)."""
        raise NotImplementedError


class LPLMStrategy(ExitStrategy):
    name = "lplm"
    help = "random exit layers in training, Eq. 9; the last layer at generation unless --exit-threshold"
    samples = True

    def training_loss(self, batch):
        """Eq. 9 for k exit-layer draws per sequence, in one batch; the loss is summed over the k."""
        model, canvas, targets, mask = batch.model, batch.canvas, batch.targets, batch.mask
        exit_layers, k = batch.exit_layers, batch.samples
        if exit_layers is None:
            # validation draws the same exit layers every time, so its loss is comparable across epochs
            generator = None
            if not model.training:
                generator = torch.Generator(device=canvas.device).manual_seed(0)
            exit_layers = sample_exit_layers(canvas, model.num_exit_layers, k, generator)
        else:
            k = exit_layers.size(0) // canvas.size(0)
        if k > 1:
            canvas = canvas.repeat_interleave(k, dim=0)
            targets = targets.repeat_interleave(k, dim=0)
            mask = mask.repeat_interleave(k, dim=0)
        exit_layers = exit_layers.masked_fill(canvas.eq(batch.pad), 1)  # padding runs no extra layer
        states, _ = model(prev_output_tokens=canvas, exit_layers=exit_layers, **batch.net_input)
        layers = exit_layers[mask]
        if k > 1 and batch.sequence_loss is not None:
            raise ValueError("--lplm-samples above 1 does not combine with --ctc")
        scored = replace(batch, targets=targets, mask=mask)
        loss, nll_loss = scored.score_exit_states(model.decoder, states, exit_layers)
        return loss, nll_loss, layers, k


class HardStrategy(ExitStrategy):
    name = "hard"
    help = "entropy below --model-exit-threshold, Eq. 10"

    def generation_policy(self, model_cfg, threshold=None, banned=(), eos=None):
        """Hard exit at ``--exit-threshold`` if given, else at the δ the model was trained with."""
        return super().generation_policy(
            model_cfg, model_cfg.model_exit_threshold if threshold is None else threshold, banned, eos
        )

    def training_loss(self, batch):
        """Hard early exit (Eq. 10) as at inference: each token's exit layer is the first whose
        off-ramp entropy is below δ (no gradient through the decision); the loss is taken there.
        With --hard-all-layer-loss, the mean loss over the layers that ran is added, each layer scored
        on its own output at every trained position (exited tokens included)."""
        model, targets, mask = batch.model, batch.targets, batch.mask
        policy = EntropyExit(model.cfg.model_exit_threshold, keep_predictions=False)
        all_layers = model.cfg.hard_all_layer_loss
        states, extra = model(prev_output_tokens=batch.canvas, policy=policy, return_all_hiddens=all_layers,
                              **batch.net_input)
        layers = extra["exit_layers"][mask]
        loss, nll_loss = batch.score_exit_states(model.decoder, states, extra["exit_layers"])
        if all_layers:
            per_layer = extra["layer_outputs"]
            for layer, h in enumerate(per_layer, start=1):
                l_loss, _ = batch.score_rows(model.decoder.off_ramp(h.transpose(0, 1)[mask], layer))
                loss = loss + l_loss / len(per_layer)
        return loss, nll_loss, layers, 1


class SoftStrategy(ExitStrategy):
    name = "soft"
    help = "argmax embedding fed to the next layer, Eq. 11-12; the last layer is read"
    soft_mix = True

    def generation_policy(self, model_cfg, threshold=None, banned=(), eos=None):
        check_threshold(threshold)
        if threshold:
            raise ValueError("--exit-threshold does not apply to a model trained with --early-exit soft")
        return SoftExit(banned=banned)

    def training_loss(self, batch):
        """Soft early exit (Eq. 11-12): cross-entropy at every layer, averaged over layers;
        nll_loss reports the last layer, which generation reads."""
        model, mask = batch.model, batch.mask
        policy = SoftExit(
            gold=batch.gold,
            gold_mask=batch.gold_mask,
            gold_prob=model.cfg.soft_gold_prob if model.training else 0.0,
            keep_logits=True,
            banned=batch.banned,  # as in generation: the next layer sees the embedding generation feeds it
        )
        states, extra = model(prev_output_tokens=batch.canvas, policy=policy, **batch.net_input)
        L = model.num_exit_layers
        loss, nll_loss = batch.score_exit_states(model.decoder, states, L)
        loss = loss / L
        # the inner layers' logits are (T, B, V), computed at every position for the argmax: the loss
        # reads the trained positions in place (no gather of vocabulary-sized rows)
        for logits in extra["predictions"].get("layer_logits", []):
            l_loss, _ = batch.score_canvas(logits)
            loss = loss + l_loss / L
        return loss, nll_loss, torch.full((int(mask.sum()),), L, dtype=torch.long, device=mask.device), 1


STRATEGIES = {s.name: s for s in (LPLMStrategy(), HardStrategy(), SoftStrategy())}
EARLY_EXIT_HELP = "exit strategy, in training and generation: " + ", ".join(
    f"{s.name} ({s.help})" for s in STRATEGIES.values()
)


def strategy_of(model_cfg) -> ExitStrategy:
    """The strategy a model configuration names (``--early-exit``)."""
    name = str(model_cfg.early_exit)
    if name not in STRATEGIES:
        raise ValueError(f"--early-exit must be one of {', '.join(STRATEGIES)}, got {name!r}")
    return STRATEGIES[name]
