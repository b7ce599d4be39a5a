"""The argmax of an off-ramp's logits without the full fp32 projection (soft exit's inner layers at CPU
inference).

Soft exit (Eq. 11-12) needs only ``argmax_v (W h)_v`` after every layer but the last: the token whose
embedding is mixed into the next layer. At batch size 1 on a CPU that projection reads the whole
(V, C) fp32 matrix from memory for a handful of positions, and the three off-ramps of a 3-layer decoder
cost as much as its layers. ``screened_argmax`` reads a bfloat16 copy of W instead (half the bytes,
and the CPU's bf16 dot-product instructions), bounds the rounding error of every approximate logit,
and scores in fp32 only the few ids whose approximate logit lies within twice that bound of the best:
the winner of the fp32 logits is always among them.

The bound (per position h, over every id v; u = 2^-8, bfloat16's unit roundoff; fp32 accumulation):
rounding h and w_v to bf16 moves their product by at most (2u + u^2) |h|.|w_v|, the fp32 sum by at
most C 2^-24 |h|.|w_v|, rounding the result to bf16 by u |s_v| <= u (1 + u)^2 |h|.|w_v|; with
|h|.|w_v| <= ||h|| ||w_v|| <= ||h|| max_v ||w_v|| (Cauchy-Schwarz), every approximate logit is within
``ROUNDING * ||h|| * max_v ||w_v||`` of the exact one, ROUNDING = 2^-7 + 2^-8 + 2^-12 for C <= 4096.
Where more than ``k`` ids fall within the screen (a flat distribution), the full fp32 projection is
computed instead (one host read of a flag, free on a CPU; counted in ``ScreenStats``).

The winner is that of the fp32 logits as ``torch.bmm`` computes them for the candidates, ties to the
lower id; ``F.linear`` sums in another order, so the two can differ where the two best logits are
within fp32 rounding of each other (~1e-6 relative).
"""

import torch
import torch.nn.functional as F

from .exit_policies import ban_tokens, fill_banned_

ROUNDING = 2.0**-7 + 2.0**-8 + 2.0**-12
MAX_DIM = 4096  # the accumulation term of ROUNDING (C 2^-24 <= 2^-12) holds up to this width


class ScreenStats:
    """Calls screened and calls that fell back to the full projection (for benchmarks and tests)."""

    def __init__(self):
        self.calls = 0
        self.fallbacks = 0


class LowPrecisionWeight:
    """A bf16 copy of a (V, C) weight and its largest row norm, rebuilt when the weight changes
    (another tensor, or an in-place update: its version counter)."""

    def __init__(self):
        self._key = None
        self.low = None
        self.max_row_norm = None

    def get(self, weight):
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if key != self._key:
            with torch.no_grad():
                self.low = weight.detach().to(torch.bfloat16)
                self.max_row_norm = float(weight.detach().float().norm(dim=-1).max())
            self._key = key
        return self.low, self.max_row_norm


def full_argmax(x, weight, banned):
    """The reference and the fallback: ``argmax`` of ``F.linear(x, weight)`` with the ``banned`` ids
    excluded, ties to the lowest id (``allowed_argmax``, the unscreened path, agrees except where more
    than ``len(banned) + 1`` logits tie exactly at the top)."""
    return ban_tokens(F.linear(x, weight), list(banned)).argmax(-1)


def screened_argmax(x, weight, low, max_row_norm, banned=(), k=16, stats=None):
    """``argmax_v (x W^T)_v`` over ids not in ``banned``, for fp32 ``x`` (..., C) and ``weight`` (V, C),
    screened on ``low`` (``weight`` in bf16) as the module docstring explains. Returns (...,) long."""
    if x.size(-1) > MAX_DIM:
        raise ValueError(f"screened_argmax: width {x.size(-1)} above {MAX_DIM}, where its error bound stops holding")
    shape = x.shape[:-1]
    flat = x.reshape(-1, x.size(-1))
    if stats is not None:
        stats.calls += 1
    if flat.size(0) == 0:
        return flat.new_zeros(shape, dtype=torch.long)
    approx = F.linear(flat.to(torch.bfloat16), low).float()
    fill_banned_(approx, banned)
    norm = flat.norm(dim=-1)
    bound = ROUNDING * max_row_norm * norm  # |approx - exact| for every id, per position
    top, ids = approx.topk(min(k, approx.size(-1)), dim=-1)
    # every id that can win lies above top[:, 0] - 2 bound; all of them are among the k when the k-th
    # is below that line (a NaN or inf anywhere fails the test and takes the full projection). A zero
    # state (padding after a layer) ties every logit at 0: the lowest allowed id wins, as in argmax.
    zero = norm.eq(0)
    if not bool(((top[:, -1] < top[:, 0] - 2 * bound) | zero).all()):
        if stats is not None:
            stats.fallbacks += 1
        return full_argmax(flat, weight, banned).view(shape)
    exact = torch.bmm(weight[ids], flat[:, :, None]).squeeze(-1)  # (N, k) fp32 logits of the candidates
    best = exact.amax(-1, keepdim=True)
    winner = torch.where(exact.eq(best), ids, approx.size(-1)).amin(-1)
    lowest_allowed = min(set(range(len(banned) + 1)) - set(banned))
    return winner.masked_fill(zero, lowest_allowed).view(shape)
