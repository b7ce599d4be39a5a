"""CTC over the canvas (``--ctc``): the output is the canvas read with blanks.

Not in the ELMER paper: connectionist temporal classification (Graves et al.
2006) as non-autoregressive translation uses it (Libovický and Helcl 2018;
Gu and Kong 2021). Every canvas position predicts a token or the blank; the
output is the canvas's tokens with consecutive repeats merged and blanks
removed, so its length is decided by the one pass itself (no ``</s>`` cut,
no length rule) and a token written twice in a row is written once. The
training loss is -log P(y | x), summed over every canvas labelling that
reads as the reference y (``ctc_loss``). The blank is ``<mask>``, the canvas
token: with soft exit, a position whose argmax is the blank feeds the next
layer the canvas embedding it started from. The canvas must be longer than
the reference (the recipes give it 1.5 times the data's canvas rule, the p99 of target lengths);
a reference that cannot fit is counted (``infeasible``) and left out.
"""

import torch
import torch.nn.functional as F

from .canvas import compact

NEG_INF = float("-inf")


def ctc_targets(target, pad: int, eos: int):
    """The reference without ``</s>`` and padding, left-aligned: (targets (B, S), lengths (B,))."""
    lengths, moved = compact(target.ne(pad) & target.ne(eos), target)
    width = max(int(lengths.max()) if lengths.numel() else 0, 1)
    targets = moved[:, :width].masked_fill(
        torch.arange(width, device=target.device)[None, :] >= lengths[:, None], pad)
    return targets, lengths


def feasible(targets, target_lengths, input_lengths):
    """Whether each reference has a CTC path on its canvas: T >= S + (consecutive equal pairs in y),
    since two equal neighbours need a blank between them."""
    width = targets.size(1)
    valid = torch.arange(width, device=targets.device)[None, :] < target_lengths[:, None]
    repeats = (targets[:, 1:] == targets[:, :-1]) & valid[:, 1:]
    return target_lengths + repeats.sum(1) <= input_lengths


def ctc_loss(logits, targets, target_lengths, input_lengths, blank: int, eps: float = 0.0):
    """(loss, nll, feasible (B,)) sums over the batch, from ``logits`` (T, B, V) on canvases of
    ``input_lengths``: nll = sum over sentences of -log P(y | x) (torch's ``ctc_loss``), loss =
    (1 - eps) nll + eps x smoothing, the smoothing term being each sentence's mean over its canvas
    positions of -mean_v log p_v, times its reference length (so it weighs per reference token as
    fairseq's label smoothing does). References without a path (``feasible``) add nothing."""
    lprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    ok = feasible(targets, target_lengths, input_lengths)
    nll = F.ctc_loss(lprobs, targets, input_lengths, target_lengths, blank=blank, reduction="none",
                     zero_infinity=True)
    nll = (nll * ok).sum()
    if eps <= 0:
        return nll, nll, ok
    slots = torch.arange(lprobs.size(0), device=lprobs.device)[:, None] < input_lengths[None, :]  # (T, B)
    per_position = -lprobs.mean(-1) * slots
    smooth = per_position.sum(0) / input_lengths.clamp(min=1) * target_lengths * ok
    return (1.0 - eps) * nll + eps * smooth.sum(), nll, ok


def extended_labels(targets, target_lengths, blank: int):
    """CTC's label sequence z = (blank, y1, blank, y2, ..., yS, blank): (B, 2S + 1), and whether
    a path may skip from z[s - 2] to z[s] (z[s] is a token unlike z[s - 2])."""
    B, S = targets.shape
    z = targets.new_full((B, 2 * S + 1), blank)
    z[:, 1::2] = targets
    width = 2 * target_lengths + 1
    z = z.masked_fill(torch.arange(2 * S + 1, device=z.device)[None, :] >= width[:, None], blank)
    skip = z.ne(blank) & z.ne(F.pad(z[:, :-2], (2, 0), value=blank))
    return z, skip


def viterbi_alignment(lprobs, targets, target_lengths, input_lengths, blank: int):
    """The most probable CTC path of each reference on its canvas: (B, T) labels (a token of y or
    ``blank``; ``blank`` past the canvas and where no path exists). ``lprobs`` (B, T, V).

    The max-product recursion over canvas positions is sequential by nature: one vectorised step per
    position (over the batch and the 2S + 1 states), then one per position back along the pointers."""
    B, T, _ = lprobs.shape
    z, skip = extended_labels(targets, target_lengths, blank)
    n_states = z.size(1)
    emit = lprobs.float().gather(2, z[:, None, :].expand(B, T, n_states))  # (B, T, 2S + 1)
    state = torch.arange(n_states, device=z.device)[None, :]
    score = torch.where(state < 2, emit[:, 0], torch.full_like(emit[:, 0], NEG_INF))
    score = score.masked_fill(state >= 2 * target_lengths[:, None] + 1, NEG_INF)
    back = torch.zeros(B, T, n_states, dtype=torch.long, device=z.device)
    for t in range(1, T):
        stay = score
        step = F.pad(score[:, :-1], (1, 0), value=NEG_INF)
        jump = F.pad(score[:, :-2], (2, 0), value=NEG_INF).masked_fill(~skip, NEG_INF)
        best, arg = torch.stack([stay, step, jump], -1).max(-1)
        running = (t < input_lengths)[:, None]
        score = torch.where(running, best + emit[:, t], score)
        back[:, t] = torch.where(running, arg, torch.zeros_like(arg))
    last = 2 * target_lengths  # end on the final blank or the final token
    end_blank = score.gather(1, last[:, None]).squeeze(1)
    end_token = score.gather(1, (last - 1).clamp(min=0)[:, None]).squeeze(1)
    s = torch.where((end_token > end_blank) & (target_lengths > 0), last - 1, last)
    reachable = torch.maximum(end_blank, end_token) > NEG_INF
    labels = z.new_full((B, T), blank)
    for t in range(T - 1, -1, -1):
        labels[:, t] = z.gather(1, s[:, None]).squeeze(1)
        s = s - back[:, t].gather(1, s[:, None]).squeeze(1)
    beyond = torch.arange(T, device=z.device)[None, :] >= input_lengths[:, None]
    return labels.masked_fill(beyond | ~reachable[:, None], blank)


def collapse(tokens, scores, valid, blank: int, *aligned):
    """CTC's reading of a canvas: merge consecutive equal tokens, then drop blanks and padding
    (``valid`` False). Vectorised: the kept positions (the first of each run, if not blank) move to
    the front by a stable sort. Returns (tokens, scores, lengths, *aligned), each kept token with the
    score (and ``aligned`` values) of its run's first position."""
    prev = F.pad(tokens[:, :-1], (1, 0), value=-1)
    kept, tokens, scores, *aligned = compact(valid & tokens.ne(blank) & tokens.ne(prev), tokens, scores, *aligned)
    return (tokens, scores, kept) + tuple(aligned)
