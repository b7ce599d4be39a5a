"""Token-level exit policies: at which decoder layer each token leaves.

The decoder (``ElmerDecoder.forward``) runs its layers and, after each layer
``l``, asks the policy which of the still-active tokens exit there. A token
that exits at ``l`` keeps ``h^l`` in every upper layer (paper §4.1). The
policies are:

- ``AssignedExit``: exit layers given in advance; LPLM draws them uniformly
  from 1..L (paper §4.2, Eq. 9).
- ``LastLayerExit``: every token exits at the last layer (plain NAR decoding).
- ``EntropyExit``: hard early exit; a token exits at the first layer whose
  off-ramp entropy (natural log) is below the threshold δ (Eq. 10).

Masks are laid out (T, B) like the decoder's hidden states.
"""

import torch


class ExitPolicy:
    """Base class. ``may_stop_early``: the decoder checks "all exited?" per layer."""

    may_stop_early = False

    def num_layers_to_run(self, num_layers: int) -> int:
        return num_layers

    def exit_now(self, layer: int, states, decoder):
        """Bool (T, B): tokens whose exit condition holds after ``layer`` (1-based)."""
        raise NotImplementedError

    def __call__(self, layer: int, states, active, is_last: bool, decoder):
        """Bool (T, B): the active tokens that exit at ``layer``; all of them at the last."""
        if is_last:
            now = active
        else:
            now = self.exit_now(layer, states, decoder) & active
        self.record(layer, states, now, decoder)
        return now

    def record(self, layer: int, states, now, decoder):
        """Hook for policies that keep the predictions made at the exit layer."""


class LastLayerExit(ExitPolicy):
    def exit_now(self, layer, states, decoder):
        return torch.zeros(states.shape[:2], dtype=torch.bool, device=states.device)


class AssignedExit(ExitPolicy):
    """Exit layers fixed in advance, shape (B, T), values in 1..L (Eq. 9)."""

    def __init__(self, exit_layers):
        self.exit_layers = exit_layers.t()
        # one host sync before the layer loop: stop once the highest exit layer is done
        self._last = int(exit_layers.max()) if exit_layers.numel() > 0 else 1

    def num_layers_to_run(self, num_layers):
        if self._last > num_layers or self._last < 1:
            raise ValueError(f"exit layers must lie in 1..{num_layers}, got a maximum of {self._last}")
        return self._last

    def exit_now(self, layer, states, decoder):
        return self.exit_layers.eq(layer)


class EntropyExit(ExitPolicy):
    """Hard early exit (Eq. 10): exit where the off-ramp entropy is below ``threshold``.

    Keeps the argmax token and its log-probability at each token's exit layer,
    so the generator does not project the states a second time. ``banned``
    token ids (``<pad>``, ``<s>``, ``<mask>``) are never predicted; the
    entropy is that of the full off-ramp distribution.
    """

    may_stop_early = True

    def __init__(self, threshold: float, banned=()):
        if threshold < 0:
            raise ValueError(f"--exit-threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        self.banned = list(banned)
        self.tokens = None
        self.scores = None
        self._lprobs = None

    def exit_now(self, layer, states, decoder):
        self._lprobs = decoder.off_ramp_log_probs(states, layer)
        entropy = -(self._lprobs.exp() * self._lprobs).sum(-1)
        return entropy < self.threshold

    def record(self, layer, states, now, decoder):
        lprobs = self._lprobs if self._lprobs is not None else decoder.off_ramp_log_probs(states, layer)
        self._lprobs = None
        if self.banned:
            lprobs = lprobs.index_fill(-1, lprobs.new_tensor(self.banned, dtype=torch.long), float("-inf"))
        scores, tokens = lprobs.max(-1)
        if self.tokens is None:
            self.tokens, self.scores = tokens, scores
        else:
            self.tokens = torch.where(now, tokens, self.tokens)
            self.scores = torch.where(now, scores, self.scores)
