"""The decoder canvas: how many ``<mask>`` slots the NAR decoder fills.

ELMER has no length predictor (paper §4.1): the decoder fills a canvas of T
``<mask>`` tokens and the output is cut at the first ``</s>``. T must never
depend on the reference, so it is a rule on the source length alone,

    T = clamp(floor(a * src_len + b), 1, max_target_positions),

used identically in training (by the criterion) and in generation.
"""

import torch

MASK_SYMBOL = "<mask>"  # the canvas token: a real dictionary symbol (fairseq's NAT models use <unk>)
POST_EOS_CHOICES = ("ignore", "pad", "eos")
LONG_TARGET_CHOICES = ("truncate", "skip")


def canvas_lengths(src_lengths, a: float, b: int, max_len: int):
    """Per-sentence canvas length T from the source length (a rule, never the reference)."""
    lengths = torch.floor(src_lengths.to(torch.float64) * a + b).long()
    return lengths.clamp(min=1, max=max_len)


def make_canvas(lengths, mask_idx: int, pad_idx: int):
    """A right-padded (B, max T) batch of ``<mask>`` tokens (Eq. 5 input)."""
    width = int(lengths.max()) if lengths.numel() > 0 else 1
    positions = torch.arange(width, device=lengths.device)
    canvas = torch.full((lengths.size(0), width), mask_idx, dtype=torch.long, device=lengths.device)
    return canvas.masked_fill_(positions[None, :] >= lengths[:, None], pad_idx)


def align_targets(target, canvas, pad_idx: int, eos_idx: int, post_eos: str, long_target: str):
    """Lay a right-padded ``y + </s>`` target batch onto the canvas.

    Returns ``(targets, loss_mask, n_long)``: ``targets`` is (B, T) like the
    canvas, ``loss_mask`` marks the positions that carry a loss, ``n_long``
    counts the targets longer than their canvas. Long targets are cut to the
    canvas (``truncate``) or left out of the loss (``skip``); either way they
    are counted so the caller can log them.

    Positions after ``</s>`` are not trained (``ignore``), or are taught to
    emit ``<pad>`` or ``</s>`` (``pad`` / ``eos``).
    """
    if post_eos not in POST_EOS_CHOICES:
        raise ValueError(f"--post-eos must be one of {POST_EOS_CHOICES}, got {post_eos!r}")
    if long_target not in LONG_TARGET_CHOICES:
        raise ValueError(f"--long-target must be one of {LONG_TARGET_CHOICES}, got {long_target!r}")
    bsz, width = canvas.shape
    slots = canvas.ne(pad_idx)
    tgt_len = target.ne(pad_idx).sum(1)
    canvas_len = slots.sum(1)
    is_long = tgt_len > canvas_len

    # copy the reference into the canvas; positions beyond it get the post-EOS filler
    common = min(width, target.size(1))
    filler = eos_idx if post_eos == "eos" else pad_idx
    targets = torch.full_like(canvas, filler)
    targets[:, :common] = target[:, :common]
    positions = torch.arange(width, device=canvas.device)[None, :]
    in_ref = positions < tgt_len[:, None]
    targets = torch.where(in_ref, targets, torch.full_like(targets, filler))

    loss_mask = slots & (in_ref | (post_eos != "ignore"))
    if long_target == "skip":
        loss_mask &= ~is_long[:, None]
    targets = targets.masked_fill(~slots, pad_idx)
    return targets, loss_mask, is_long.sum()


def compact(keep, *tensors):
    """Each row's positions that ``keep`` (B, T) marks moved to its front, in their order (a stable
    sort; what follows them is the rest, unspecified), in each of ``tensors`` (B, T). Returns
    (kept per row (B,), *moved tensors)."""
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    return (keep.sum(1),) + tuple(t.gather(1, order) for t in tensors)


def canvas_rule_from_targets(target_lengths, percentile: float = 0.99):
    """The data-driven canvas rule the recipes use: ``(a, b) = (0, p-th percentile of the training
    targets' length in pieces + 1 for </s>)``. ``target_lengths`` are piece counts without </s>.
    Returns ``(a, b, mean)``; longer targets are counted in training as ``long_targets``."""
    lengths = sorted(int(n) + 1 for n in target_lengths)
    if not lengths:
        raise ValueError("no training targets to derive the canvas length from")
    b = lengths[min(len(lengths) - 1, int(percentile * len(lengths)))]
    return 0, b, sum(lengths) / len(lengths)


def main(argv=None):
    """``elmer-canvas TRAIN_TARGET_PIECES [--env FILE]``: the recipes' canvas rule
    from a training split's target side (one sentence of pieces a line), written as shell variables
    CANVAS_A/CANVAS_B for ``--canvas-len-a/-b``."""
    import argparse

    parser = argparse.ArgumentParser(description="the canvas rule (a, b) of a training split's targets")
    parser.add_argument("targets", help="training targets, one line of BPE pieces per example")
    parser.add_argument("--percentile", type=float, default=0.99, help="the share of targets the canvas holds")
    parser.add_argument("--env", help="write CANVAS_A=.. and CANVAS_B=.. here (a file the recipes source)")
    args = parser.parse_args(argv)
    if not 0 < args.percentile <= 1:
        parser.error(f"--percentile must be in (0, 1], got {args.percentile}")
    try:
        with open(args.targets, encoding="utf-8") as f:
            a, b, mean = canvas_rule_from_targets((len(line.split()) for line in f), args.percentile)
    except (OSError, ValueError) as e:
        parser.exit(1, f"{parser.prog}: error: {args.targets}: {e}\n")
    if args.env:
        with open(args.env, "w") as f:
            f.write(f"CANVAS_A={a}\nCANVAS_B={b}\n")
    print(f"targets (pieces + </s>): mean {mean:.1f}, p{args.percentile * 100:g} {b} -> canvas T = {b}; "
          "longer ones are counted as long_targets")
