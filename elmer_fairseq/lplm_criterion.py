"""``lplm``: Layer Permutation Language Modeling loss (paper §4.2, Eq. 9).

Every target token t gets an exit layer l_t drawn uniformly from 1..L; the
loss is -log Pr(y_t | h_t^{l_t}) at that layer's off-ramp, with the copy
semantics of the decoder (a token that exited stays a key/value above).
``--lplm-samples k`` draws k independent assignments per sequence and runs
them as one batch of k*B canvases over a single encoder pass.
"""

import argparse
import math
from dataclasses import dataclass, field

import torch
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass

from .canvas import align_targets
from .ctc import ctc_loss, ctc_targets, feasible, viterbi_alignment
from .exit_policies import allowed_argmax, banned_tokens
from .exit_strategies import STRATEGIES, TrainingBatch, strategy_of
from .option_checks import add_checked_args, at_least, check_fields, within


@dataclass
class LPLMCriterionConfig(FairseqDataclass):
    lplm_samples: int = field(
        default=1,
        metadata={
            "help": "exit-layer assignments drawn per sequence, run in one batched pass (paper: 10 in pre-training)",
            "check": at_least(1),
        },
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "label smoothing epsilon, 0 for none", "check": within(0, 1, True)}
    )
    glat: bool = field(
        default=False,
        metadata={
            "help": "glancing training (GLAT, Qian et al. 2021), with every exit strategy: a no-grad first pass "
            "with the generation policy, then ratio x (Hamming distance to the reference) reference tokens, "
            "at random positions, replace <mask> on the canvas; the loss is taken on the other positions. "
            "Generation is unchanged (one pass from an all-<mask> canvas)"
        },
    )
    glat_ratio: float = field(
        default=0.5,
        metadata={
            "help": "glancing ratio at the first update (fraction of the Hamming distance revealed)",
            "check": within(0, 1),
        },
    )
    glat_ratio_end: float = field(
        default=0.3,
        metadata={"help": "glancing ratio reached, linearly, at --glat-anneal-updates", "check": within(0, 1)},
    )
    glat_anneal_updates: int = field(
        default=0,
        metadata={"help": "updates over which the glancing ratio anneals from --glat-ratio to --glat-ratio-end "
                  "(e.g. --max-update); 0: --glat-ratio throughout", "check": at_least(0)},
    )


class _SmoothedNLL(torch.autograd.Function):
    """fairseq's ``label_smoothed_nll_loss`` (summed) on ``log_softmax(logits)``, with a weight per
    position, in one function: the forward keeps the log-probabilities only, and the backward writes
    the gradient in one vocabulary-sized tensor,

        d loss / d x_k = w (p_k - eps_i - (1 - eps - eps_i) [k = y]),  eps_i = eps / (V - 1)

    (the smoothing coefficients sum to one), instead of autograd's chain of gather, sum, scatter
    and log-softmax backward. Positions of weight 0 cost no copy of their logits and get zero
    gradient."""

    @staticmethod
    def forward(ctx, logits, target, weight, eps):
        lprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # bf16/fp16 logits: no fp32 copy
        nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        eps_i = eps / (lprobs.size(-1) - 1)
        loss = (1.0 - eps - eps_i) * nll + eps_i * -lprobs.sum(-1)
        ctx.save_for_backward(lprobs, target, weight)
        ctx.eps, ctx.dtype = eps, logits.dtype
        return (loss * weight).sum(), (nll * weight).sum()

    @staticmethod
    def backward(ctx, grad_loss, grad_nll):
        lprobs, target, weight = ctx.saved_tensors
        eps_i = ctx.eps / (lprobs.size(-1) - 1)
        # the gradient in the logits' own dtype (bf16 under --autocast-bf16: half the memory, no final cast)
        grad = lprobs.exp() if ctx.dtype == torch.float32 else lprobs.to(ctx.dtype).exp_()
        grad.mul_((weight * (grad_loss + grad_nll)).unsqueeze(-1))
        grad.sub_((weight * grad_loss * eps_i).unsqueeze(-1))
        gold = weight * (grad_loss * (1.0 - ctx.eps - eps_i) + grad_nll)
        grad.scatter_add_(-1, target.unsqueeze(-1), -gold.unsqueeze(-1).to(grad.dtype))
        return grad, None, None, None


def smoothed_nll(logits, target, eps, weight=None):
    """(label-smoothed loss, nll loss) sums of ``logits`` (..., V) against ``target`` (...), each
    position weighted by ``weight`` (..., a 0/1 mask; all ones if None): fairseq's
    ``label_smoothed_nll_loss(log_softmax(logits), target, eps, reduce=True)`` on the weighted
    positions, computed by ``_SmoothedNLL``."""
    if weight is None:
        weight = torch.ones(target.shape, dtype=torch.float, device=target.device)
    return _SmoothedNLL.apply(logits, target, weight.float(), float(eps))


@register_criterion("lplm", dataclass=LPLMCriterionConfig)
class LPLMCriterion(FairseqCriterion):
    def __init__(self, task, lplm_samples=1, label_smoothing=0.0, glat=False, glat_ratio=0.5, glat_ratio_end=0.3,
                 glat_anneal_updates=0):
        super().__init__(task)
        given = argparse.Namespace(lplm_samples=lplm_samples, label_smoothing=label_smoothing, glat_ratio=glat_ratio,
                                   glat_ratio_end=glat_ratio_end, glat_anneal_updates=glat_anneal_updates)
        check_fields(given, LPLMCriterionConfig)
        self.k = lplm_samples
        self.eps = label_smoothing
        self.glat = glat
        self.glat_ratio = glat_ratio
        self.glat_ratio_end = glat_ratio_end
        self.glat_anneal_updates = glat_anneal_updates or 0
        self.num_updates = 0
        self.banned = banned_tokens(task.target_dictionary)
        self.banned_ctc = banned_tokens(task.target_dictionary, ctc=True)

    @classmethod
    def add_args(cls, parser):
        add_checked_args(parser, LPLMCriterionConfig)

    def set_num_updates(self, num_updates):
        """Called by the task before every training step (the glancing ratio anneals with it)."""
        self.num_updates = num_updates

    def glancing_ratio(self):
        if self.glat_anneal_updates <= 0:
            return self.glat_ratio
        frac = min(self.num_updates / self.glat_anneal_updates, 1.0)
        return self.glat_ratio + frac * (self.glat_ratio_end - self.glat_ratio)

    def forward(self, model, sample, reduce=True, exit_layers=None):
        """Loss of one batch under the model's --early-exit strategy.

        ``exit_layers`` (k*B, T) overrides LPLM's random draw (for tests).
        """
        src_tokens = sample["net_input"]["src_tokens"]
        src_lengths = sample["net_input"]["src_lengths"]
        canvas = model.initialize_canvas(src_lengths)
        ctc = getattr(model.cfg, "ctc", False)
        # fixed exit layers (tests) are an LPLM pass whatever the model's strategy
        strategy = STRATEGIES["lplm"] if exit_layers is not None else strategy_of(model.cfg)
        if self.k != 1 and not strategy.samples:
            raise ValueError(f"--lplm-samples {self.k} applies to --early-exit lplm only, not {strategy.name}")
        net_input = {"src_tokens": src_tokens, "src_lengths": src_lengths}
        glance = self.glat and model.training
        if glance:
            # one encoder pass (with gradient) serves the glancing pass and the trained pass
            net_input["encoder_out"] = model.encoder(src_tokens, src_lengths=src_lengths)
        common = dict(model=model, net_input=net_input, pad=self.task.target_dictionary.pad(),
                      banned=self.banned_ctc if ctc else self.banned, nll=self._nll, samples=self.k,
                      exit_layers=exit_layers)
        make = self._ctc_batch if ctc else self._aligned_batch
        batch, sample_size, n_long, revealed = make(model, sample, canvas, glance, common)
        loss, nll_loss, layers, k = strategy.training_loss(batch)

        logging_output = {
            "loss": loss.data / k,
            "nll_loss": nll_loss.data / k,
            "ntokens": sample["ntokens"],
            "nsentences": src_tokens.size(0),
            "sample_size": sample_size,
            "exit_layer_sum": layers.sum().data / k,
            "exit_tokens": layers.numel() / k,  # trained tokens, or (--ctc) canvas slots
            "long_targets": n_long,
        }
        # per-layer exit counts (the exit_frac_l* scalars); bincount stays on the device
        counts = torch.bincount(layers.detach(), minlength=model.num_exit_layers + 1)
        for layer in range(1, model.num_exit_layers + 1):
            logging_output[f"exit_count_l{layer}"] = counts[layer].data / k
        if revealed is not None:
            logging_output["glat_revealed"] = revealed.sum().data
            logging_output["glat_ratio_x1000"] = 1000 * self.glancing_ratio() * src_tokens.size(0)
        return loss / k, sample_size, logging_output

    def _aligned_batch(self, model, sample, canvas, glance, common):
        """The reference laid on the canvas position by position (``align_targets``), glanced at with
        --glat: (TrainingBatch, sample size = trained positions, long targets, revealed or None)."""
        d = self.task.target_dictionary
        targets, mask, n_long = align_targets(
            sample["target"], canvas, d.pad(), d.eos(), model.cfg.post_eos, model.cfg.long_target
        )
        revealed = None
        if glance:
            canvas, mask, revealed = self._glance(model, common["net_input"], canvas, targets, mask)
        return TrainingBatch(canvas=canvas, targets=targets, mask=mask, **common), mask.sum(), n_long, revealed

    def _ctc_batch(self, model, sample, canvas, glance, common):
        """--ctc: the whole canvas scored by ``ctc.ctc_loss`` against the reference without </s>, glanced
        at with --glat through its alignment: (TrainingBatch, sample size = reference tokens with a
        path on their canvas, references without one, revealed or None)."""
        d = self.task.target_dictionary
        reference, ref_lengths = ctc_targets(sample["target"], d.pad(), d.eos())
        slots = canvas.ne(d.pad())
        canvas_lengths = slots.sum(1)
        fits = feasible(reference, ref_lengths, canvas_lengths)
        blank = model.decoder.mask_idx
        alignment = revealed = None
        if glance:
            canvas, alignment, revealed = self._glance_ctc(
                model, common["net_input"], canvas, reference, ref_lengths, canvas_lengths, fits, blank)

        def sequence_loss(logits):
            return ctc_loss(logits, reference, ref_lengths, canvas_lengths, blank, self.eps)[:2]

        batch = TrainingBatch(canvas=canvas, targets=canvas, mask=slots, sequence_loss=sequence_loss,
                              gold=alignment, gold_mask=None if alignment is None else slots, **common)
        return batch, (ref_lengths * fits).sum(), (~fits).sum(), revealed

    def _glance(self, model, net_input, canvas, targets, mask):
        """Glancing sampling (GLAT): predict the canvas in one no-grad pass with the generation
        policy of the model's strategy, count per sentence the trained positions it gets wrong
        (Hamming distance d), and put the reference token on the canvas at ratio x d positions drawn
        uniformly among the reference tokens. Returns (canvas, loss mask without the revealed
        positions, revealed (B, T))."""
        pad = self.task.target_dictionary.pad()
        with torch.no_grad():
            predicted, _ = self._first_pass(model, net_input, canvas, self.banned)
            revealed = self._reveal(predicted.ne(targets) & mask, mask & targets.ne(pad))
        return torch.where(revealed, targets, canvas), mask & ~revealed, revealed

    def _glance_ctc(self, model, net_input, canvas, reference, ref_lengths, canvas_lengths, fits, blank):
        """Glancing under --ctc (as Gu and Kong 2021): the first pass's most probable CTC path of the
        reference (``ctc.viterbi_alignment``) stands for the reference on the canvas; d counts the
        positions whose prediction differs from it (blanks included), and ratio x d of its non-blank
        positions get their token on the canvas. Returns (canvas, alignment (B, T), revealed (B, T))."""
        slots = canvas.ne(self.task.target_dictionary.pad()) & fits[:, None]
        with torch.no_grad():
            predicted, logits = self._first_pass(model, net_input, canvas, self.banned_ctc, need_logits=True)
            alignment = viterbi_alignment(torch.log_softmax(logits.float(), -1), reference, ref_lengths,
                                          canvas_lengths, blank)
            revealed = self._reveal(predicted.ne(alignment) & slots, slots & alignment.ne(blank))
        return torch.where(revealed, alignment, canvas), alignment, revealed

    @staticmethod
    def _first_pass(model, net_input, canvas, banned, need_logits=False):
        """GLAT's no-grad pass with the generation policy of the model's strategy: the predicted
        tokens (B, T) and (``need_logits``, or if the policy predicts nothing itself) the logits
        they came from (B, T, V), each position at its exit layer; else None."""
        policy = strategy_of(model.cfg).generation_policy(model.cfg, banned=banned)
        states, extra = model(prev_output_tokens=canvas, policy=policy, **net_input)
        if policy.predicts and not need_logits:  # hard exit kept each token's argmax at its exit layer
            return extra["predictions"]["tokens"], None
        layers = extra["exit_layers"].clamp(min=1)  # padding: any layer
        logits = model.decoder.project(states.reshape(-1, states.size(-1)), layers.reshape(-1))
        logits = logits.view(states.shape[:2] + logits.shape[-1:])
        return allowed_argmax(logits, banned), logits

    def _reveal(self, wrong, candidates):
        """Which positions show their reference token: per sentence ratio x (wrong positions),
        drawn uniformly among ``candidates`` (both (B, T) bool)."""
        n_reveal = (wrong.sum(1).float() * self.glancing_ratio()).long()
        keys = torch.rand(candidates.shape, device=candidates.device).masked_fill(~candidates, 2.0)
        rank = keys.argsort(1).argsort(1)
        return (rank < n_reveal[:, None]) & candidates

    def _nll(self, logits, target, weight=None):
        return smoothed_nll(logits, target, self.eps, weight)

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        sample_size = total("sample_size")
        denom = max(sample_size, 1)
        metrics.log_scalar("loss", total("loss") / denom / math.log(2), sample_size, round=3)
        metrics.log_scalar("nll_loss", total("nll_loss") / denom / math.log(2), sample_size, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        # exit statistics per exiting token: the trained tokens, or under --ctc the canvas slots
        exits = max(total("exit_tokens"), 1) if any("exit_tokens" in log for log in logging_outputs) else denom
        metrics.log_scalar("exit_layer", total("exit_layer_sum") / exits, sample_size, round=2)
        count_keys = sorted({key for log in logging_outputs for key in log if key.startswith("exit_count_l")},
                            key=lambda key: int(key[len("exit_count_l"):]))
        for key in count_keys:  # the share of trained tokens exiting at each layer (tensorboard: one curve each)
            metrics.log_scalar("exit_frac_l" + key[len("exit_count_l"):], total(key) / exits, sample_size, round=3)
        metrics.log_scalar_sum("long_targets", total("long_targets"))
        if any("glat_revealed" in log for log in logging_outputs):
            nsentences = max(total("nsentences"), 1)
            metrics.log_scalar("glat_ratio", total("glat_ratio_x1000") / 1000 / nsentences, nsentences, round=3)
            revealed = total("glat_revealed")
            metrics.log_scalar("glat_revealed", revealed / max(revealed + sample_size, 1), sample_size, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
