"""One-pass early-exit generator for ``elmer_nat`` (paper §4.1, §4.3).

One encoder pass and one decoder pass over the ``<mask>`` canvas, no
iterations and no length predictor. Each token is read at its exit layer:
the last layer, or (hard early exit, Eq. 10) the first layer whose off-ramp
entropy is below δ. The hypothesis is cut at the first ``</s>``.

Hypotheses follow fairseq's format (``tokens`` ending in ``</s>``, ``score``,
``positional_scores``, ``alignment``) so ``fairseq-generate`` and
``fairseq-interactive`` print them as usual, plus ``exit_layers``.
"""

import logging

import torch
import torch.nn.functional as F

from .canvas import compact
from .ctc import collapse
from .exit_policies import LastLayerExit, banned_tokens, fill_banned_
from .exit_strategies import strategy_of

logger = logging.getLogger(__name__)

LENGTH_RULES = ("first-eos", "mode", "median", "quantile")


def cut_at_first_eos(tokens, eos: int, pad: int):
    """Length of each row up to and including its first ``eos``, or up to its padding.

    tokens: (B, T). Returns lengths (B,), vectorised.
    """
    width = tokens.size(1)
    positions = torch.arange(width, device=tokens.device).expand_as(tokens)
    stop = tokens.eq(eos) | tokens.eq(pad)
    first = torch.where(stop, positions, torch.full_like(positions, width)).min(1).values
    is_eos = tokens.gather(1, first.clamp(max=width - 1)[:, None]).squeeze(1).eq(eos) & (first < width)
    return first + is_eos.long()


def collapse_repeats(tokens, lengths, *aligned):
    """Drop consecutive duplicate tokens within each row's first ``lengths`` positions.

    Vectorised: kept positions are moved to the front by a stable sort. Tensors
    in ``aligned`` (same (B, T) shape: scores, exit layers) follow the tokens.
    Returns (tokens, new lengths, *aligned).
    """
    width = tokens.size(1)
    valid = torch.arange(width, device=tokens.device)[None, :] < lengths[:, None]
    prev = F.pad(tokens[:, :-1], (1, 0), value=-1)
    kept, tokens, *aligned = compact(valid & tokens.ne(prev), tokens, *aligned)
    return (tokens, kept) + tuple(aligned)


def best_tokens(logits, banned, eos=None, k=0):
    """The argmax token outside ``banned`` and its log-probability under the full softmax,
    without materialising log_softmax over the vocabulary (``logits`` is overwritten).
    With ``eos``: ``(scores, tokens, eos_scores)``, the argmax excluding ``eos`` and log p(``eos``).
    With ``k`` > 0: the ``k`` best tokens instead of the argmax (scores and tokens gain a last
    dimension of size ``k``, best first)."""
    log_norm = torch.logsumexp(logits, dim=-1)
    eos_scores = logits[..., eos] - log_norm if eos is not None else None
    logits = fill_banned_(logits, list(banned) + ([eos] if eos is not None else []))
    if k > 0:
        best, tokens = logits.topk(k, dim=-1)
        log_norm = log_norm[..., None]
    else:
        best, tokens = logits.max(-1)
    if eos is None:
        return best - log_norm, tokens
    return best - log_norm, tokens, eos_scores


def distinct_neighbours(cand_tokens, cand_scores, valid):
    """Per position one of its candidate tokens, no two neighbours the same where the candidates
    allow it: start from each position's best token; where two neighbours agree, the less
    confident one (the later on a tie) moves to its next candidate; repeat (K - 1 rounds for K
    candidates, each round vectorised over the batch and the canvas). Agreements left after the
    last round stay (``collapse_repeats`` removes them).

    cand_tokens, cand_scores: (B, T, K), best first; valid: (B, T), False at padding.
    Returns tokens, scores (B, T).
    """
    k = cand_tokens.size(-1)
    choice = cand_tokens.new_zeros(cand_tokens.shape[:2])
    for _ in range(k - 1):
        tokens = cand_tokens.gather(2, choice[..., None]).squeeze(2)
        scores = cand_scores.gather(2, choice[..., None]).squeeze(2)
        same = (tokens[:, 1:] == tokens[:, :-1]) & valid[:, 1:] & valid[:, :-1]  # pair (i, i + 1)
        later_loses = same & (scores[:, 1:] <= scores[:, :-1])
        earlier_loses = same & ~later_loses
        moves = F.pad(later_loses, (1, 0)) | F.pad(earlier_loses, (0, 1))
        choice = (choice + moves.long()).clamp(max=k - 1)
    tokens = cand_tokens.gather(2, choice[..., None]).squeeze(2)
    return tokens, cand_scores.gather(2, choice[..., None]).squeeze(2)


def length_log_probs(eos_scores, valid, post_eos: str):
    """log P(output length = i + 1) for each canvas position i (B, T), the length counting ``</s>``,
    read from the per-position log p(``</s>``) the way the model was trained (``--post-eos``):

    - ``pad``: the positions after ``</s>`` learn ``<pad>``, so p_i(``</s>``) is P(L = i + 1) itself;
    - ``ignore``: positions after ``</s>`` are untrained, so p_i(``</s>``) is the hazard
      h_i = P(L = i + 1 | L > i): P(L = i + 1) = h_i prod_{j<i} (1 - h_j);
    - ``eos``: positions after ``</s>`` learn ``</s>``, so p_i(``</s>``) is the CDF F_i = P(L <= i + 1)
      (made monotone): P(L = i + 1) = F_i - F_{i-1}.

    The canvas ends every output: the last valid slot takes the mass left (ignore, eos). Invalid
    (padding) positions get -inf.
    """
    neg_inf = torch.finfo(eos_scores.dtype).min
    last = valid & ~F.pad(valid[:, 1:], (0, 1), value=False)
    if post_eos == "pad":
        out = eos_scores
    elif post_eos == "ignore":
        log_stay = torch.log1p(-eos_scores.exp().clamp(max=1 - 1e-6))
        before = F.pad(log_stay.cumsum(1)[:, :-1], (1, 0))
        out = torch.where(last, before, eos_scores + before)
    elif post_eos == "eos":
        cdf = torch.cummax(eos_scores.exp(), dim=1).values
        prev = F.pad(cdf[:, :-1], (1, 0))
        out = torch.where(last, 1 - prev, cdf - prev).clamp(min=1e-12).log()
    else:
        raise ValueError(f"--post-eos must be one of pad, ignore, eos; got {post_eos!r}")
    return out.masked_fill(~valid, neg_inf)


def length_cdf(length_log_probs_, valid):
    """P(output length <= i + 1) for each canvas position i (B, T), from ``length_log_probs``,
    renormalised over the valid positions."""
    probs = length_log_probs_.exp() * valid
    return probs.cumsum(1) / probs.sum(1, keepdim=True).clamp(min=1e-12)


def choose_lengths(eos_scores, valid, post_eos: str, rule: str, quantile: float = 0.5):
    """Output lengths (B,), ``</s>`` included, from the length distribution (``length_log_probs``):
    ``mode``: its most probable length; ``median``: the first length whose cumulative probability
    reaches one half; ``quantile``: the first whose cumulative probability reaches ``quantile``."""
    lp = length_log_probs(eos_scores.float(), valid, post_eos)
    if rule == "mode":
        return lp.argmax(1) + 1
    level = 0.5 if rule == "median" else quantile
    reached = (length_cdf(lp, valid) >= level) & valid
    return reached.float().argmax(1) + 1


def ctc_canvas(tokens, scores, blank_scores, blank: int, penalty: float = 0.0):
    """The labels of a --ctc canvas (B, T) and their scores: the blank where ``blank_scores - penalty``
    beats the best other token's score, else that token (penalty 0: the argmax)."""
    is_blank = blank_scores - penalty > scores
    return torch.where(is_blank, torch.full_like(tokens, blank), tokens), torch.where(is_blank, blank_scores, scores)


def is_ctc(model):
    """Whether the model was trained with --ctc (older checkpoints: no)."""
    return bool(getattr(model.cfg, "ctc", False))


class EarlyExitGenerator:
    """Args:
        exit_threshold: δ for hard exit; None: the model's own strategy (``--early-exit``),
            0: every token at the last layer.
        collapse: remove consecutive duplicate tokens after generation.
        length_rule: where the output ends (``LENGTH_RULES``): ``first-eos``, the first position whose
            argmax is ``</s>`` (after ``eos_penalty`` is taken off its log-probability); ``mode`` /
            ``median``, the most probable / median length of the distribution the per-position
            p(``</s>``) defines (``length_log_probs``); ``quantile``, its ``length_quantile``
            quantile (0.5: the median; higher: longer); the positions before it take their best
            token other than ``</s>``. Never the reference: one pass, no length predictor.
        no_repeat_neighbours: K > 1: neighbouring positions do not write the same token where one of
            them has another among its K best (``distinct_neighbours``), before the length rule
            compares each position's token with ``</s>``; 0: every position its best token.
        bf16: cast the model to bfloat16 at its first batch (``--bf16-generation``; the model is changed
            in place, as fairseq-generate's ``--fp16`` halves it); the scores stay fp32.
    """

    def __init__(self, tgt_dict, exit_threshold=None, collapse=False, retain_exit_layers=True, compile=False,
                 length_rule="first-eos", eos_penalty=0.0, no_repeat_neighbours=0, length_quantile=0.5,
                 blank_penalty=0.0, bf16=False):
        if length_rule not in LENGTH_RULES:
            raise ValueError(f"--length-rule must be one of {', '.join(LENGTH_RULES)}, got {length_rule!r}")
        if not 0.0 < length_quantile < 1.0:
            raise ValueError(f"--length-quantile must be between 0 and 1 (exclusive), got {length_quantile}")
        self.length_quantile = length_quantile
        self.tgt_dict = tgt_dict
        self.eos = tgt_dict.eos()
        self.pad = tgt_dict.pad()
        self.exit_threshold = exit_threshold
        self.collapse = collapse
        self.retain_exit_layers = retain_exit_layers
        self.compile = compile
        self.length_rule = length_rule
        self.eos_penalty = eos_penalty
        self.blank_penalty = blank_penalty
        self.bf16 = bf16
        if no_repeat_neighbours == 1 or no_repeat_neighbours < 0:
            raise ValueError(f"--no-repeat-neighbours must be 0 (off) or at least 2, got {no_repeat_neighbours}")
        self.candidates = no_repeat_neighbours
        self._compiled = {}  # id(model) -> torch.compile'd last-layer forward
        # never emitted: they carry no text
        self.banned = banned_tokens(tgt_dict)
        self.banned_ctc = banned_tokens(tgt_dict, ctc=True)

    def make_policy(self, model):
        """The exit rule: --exit-threshold if given, else the checkpoint's --early-exit strategy."""
        if is_ctc(model):  # the blank plays </s>'s part: the predictions keep log p(blank) and the best other
            return strategy_of(model.cfg).generation_policy(model.cfg, self.exit_threshold, self.banned_ctc,
                                                            eos=model.decoder.mask_idx)
        return strategy_of(model.cfg).generation_policy(model.cfg, self.exit_threshold, self.banned, eos=self.eos)

    def check_ctc(self, model):
        """A --ctc model decides its own lengths: refuse the options that move an output's </s>."""
        given = [flag for flag, on in ((f"--length-rule {self.length_rule}", self.length_rule != "first-eos"),
                                       (f"--eos-penalty {self.eos_penalty:g}", self.eos_penalty != 0),
                                       (f"--no-repeat-neighbours {self.candidates}", self.candidates > 0)) if on]
        if given:
            raise ValueError(f"{', '.join(given)}: not for a model trained with --ctc, whose output length comes "
                             "from merging repeats and dropping blanks (--blank-penalty moves it); leave them at "
                             "their defaults")

    @torch.no_grad()
    def position_scores(self, model, src_tokens, src_lengths):
        """The one pass, before any length decision: per canvas position (each (B, T)) the best token
        other than ``</s>``, its log-probability, log p(``</s>``), the exit layer, and the padding mask.
        A --ctc model: the best token other than the blank, and log p(blank) in place of log p(``</s>``)."""
        canvas = model.initialize_canvas(src_lengths)
        pad = canvas.eq(self.pad)
        policy = self.make_policy(model)
        if self.compile and policy.plain_last_layer:
            logits = self._compiled_forward(model)(src_tokens, src_lengths, canvas)
            exit_layers = LastLayerExit.exit_layers(pad, model.num_exit_layers)
        else:
            states, extra = model(src_tokens, src_lengths, canvas, policy=policy)
            exit_layers = extra["exit_layers"]
            logits = None if policy.predicts else model.decoder.off_ramp(states, model.num_exit_layers)
        if is_ctc(model):  # the best token other than the blank, and log p(blank); </s> is never written
            if logits is None:
                found = extra["predictions"]
                return found["tokens"], found["scores"], found["eos_scores"], exit_layers, pad
            scores, tokens, blank_scores = best_tokens(logits.float(), self.banned_ctc, model.decoder.mask_idx)
            return tokens, scores, blank_scores, exit_layers, pad
        if logits is None:  # hard exit read each token at its own exit layer already
            if self.candidates:
                raise ValueError("--no-repeat-neighbours needs each position's best tokens at one layer: decode "
                                 "at the last layer (--exit-threshold 0) or with soft exit, not hard exit")
            found = extra["predictions"]
            tokens, scores, eos_scores = found["tokens"], found["scores"], found["eos_scores"]
        else:
            scores, tokens, eos_scores = best_tokens(logits.float(), self.banned, self.eos, self.candidates)
            if self.candidates:
                tokens, scores = distinct_neighbours(tokens, scores, ~pad)
        return tokens, scores, eos_scores, exit_layers, pad

    @torch.no_grad()  # not inference_mode: fairseq-generate rescales the scores in place
    def decode(self, model, src_tokens, src_lengths):
        """Tokens, scores and exit layers (each (B, T)) of the whole canvas, and the output lengths
        (B,) under the length rule; tokens hold ``</s>`` at each output's end."""
        if is_ctc(model):
            self.check_ctc(model)
        tokens, scores, eos_scores, exit_layers, pad = self.position_scores(model, src_tokens, src_lengths)
        if is_ctc(model):
            return self.read_ctc(tokens, scores, eos_scores, exit_layers, pad, model.decoder.mask_idx)
        if self.blank_penalty:
            raise ValueError(f"--blank-penalty {self.blank_penalty:g} applies to a model trained with --ctc only")
        if self.length_rule == "first-eos":  # </s> wherever it wins; the output ends at the first
            lengths = None
            is_eos = (eos_scores - self.eos_penalty > scores) & ~pad
        else:
            lengths = choose_lengths(eos_scores, ~pad, model.cfg.post_eos, self.length_rule, self.length_quantile)
            is_eos = torch.arange(tokens.size(1), device=tokens.device)[None, :].eq(lengths[:, None] - 1)
        tokens = torch.where(is_eos, torch.full_like(tokens, self.eos), tokens).masked_fill(pad, self.pad)
        scores = torch.where(is_eos, eos_scores, scores)
        if lengths is None:
            lengths = cut_at_first_eos(tokens, self.eos, self.pad)
        return tokens, scores, exit_layers, lengths

    def read_ctc(self, tokens, scores, blank_scores, exit_layers, pad, blank):
        """A --ctc canvas read as its output: each position writes the blank where log p(blank) minus
        ``blank_penalty`` beats its best other token (``ctc_canvas``), then ``ctc.collapse`` (repeats
        merged, blanks dropped), then ``</s>`` (score 0) after each output, as ``decode`` returns it."""
        tokens, scores = ctc_canvas(tokens, scores, blank_scores, blank, self.blank_penalty)
        tokens, scores, lengths, exit_layers = collapse(tokens, scores, ~pad, blank, exit_layers)
        tokens, scores, exit_layers = (F.pad(t, (0, 1), value=v) for t, v in
                                       ((tokens, self.pad), (scores, 0.0), (exit_layers, 0)))
        positions = torch.arange(tokens.size(1), device=tokens.device)[None, :]
        tokens = torch.where(positions.eq(lengths[:, None]), torch.full_like(tokens, self.eos), tokens)
        tokens = tokens.masked_fill(positions > lengths[:, None], self.pad)
        scores = scores.masked_fill(positions >= lengths[:, None], 0.0)
        return tokens, scores, exit_layers.masked_fill(positions >= lengths[:, None], 0), lengths + 1

    def _compiled_forward(self, model):
        """torch.compile of encoder + decoder + last off-ramp (--compile), built once per model;
        dynamic shapes, so new source/canvas lengths do not each recompile."""
        key = id(model)
        if key not in self._compiled:

            def forward(src_tokens, src_lengths, canvas):
                states, _ = model(src_tokens, src_lengths, canvas)
                return model.decoder.off_ramp(states, model.num_exit_layers)

            self._compiled[key] = torch.compile(forward, dynamic=True)
        return self._compiled[key]

    @torch.no_grad()  # not inference_mode: fairseq-generate rescales the scores in place
    def generate(self, models, sample, prefix_tokens=None, constraints=None, **kwargs):
        if len(models) != 1:
            raise NotImplementedError("the early-exit generator takes one model, not an ensemble")
        if prefix_tokens is not None or constraints is not None:
            raise NotImplementedError("the early-exit generator supports neither --prefix-size nor constraints")
        model = models[0]
        if not hasattr(model, "initialize_canvas"):
            raise TypeError(
                f"the early-exit generator needs an elmer_nat model, got {type(model).__name__}: "
                "was the checkpoint trained with --arch elmer_nat?"
            )
        if model.training:  # eval() walks every module: ~0.3 ms a call at batch size 1
            model.eval()
        if self.bf16 and model.decoder.embed_tokens.weight.dtype != torch.bfloat16:
            logger.info("--bf16-generation: the model's weights are cast to bfloat16")
            model.to(torch.bfloat16)
        net_input = sample["net_input"]
        tokens, scores, exit_layers, lengths = self.decode(model, net_input["src_tokens"], net_input["src_lengths"])
        if self.collapse:
            tokens, lengths, scores, exit_layers = collapse_repeats(tokens, lengths, scores, exit_layers)
        # one host sync for the lengths; slicing below is not a sync
        hyp_lengths = lengths.tolist()
        scores = scores.float()
        finals = []
        for i, n in enumerate(hyp_lengths):
            n = max(n, 1)
            hyp_tokens = tokens[i, :n]
            positional = scores[i, :n]
            hypo = {
                "tokens": hyp_tokens,
                "score": positional.mean(),
                "attention": None,
                "alignment": None,
                "positional_scores": positional,
            }
            if self.retain_exit_layers:
                hypo["exit_layers"] = exit_layers[i, :n]
            finals.append([hypo])
        return finals
