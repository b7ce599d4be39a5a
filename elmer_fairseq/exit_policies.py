"""Token-level exit policies: at which decoder layer each token leaves.

The decoder (``ElmerDecoder.forward``) runs its layers and, after each layer
``l``, asks the policy which of the still-active tokens exit there. A token
that exits at ``l`` keeps ``h^l`` in every upper layer (paper §4.1). Before
the next layer the policy may also rewrite the states (soft exit). A policy
holds its settings only: what it produces during a pass (hard exit's
predictions, soft exit's per-layer logits) goes into the ``out`` dict that the
decoder owns and returns as ``extra["predictions"]``. The policies are:

- ``AssignedExit``: exit layers given in advance; LPLM draws them uniformly
  from 1..L (paper §4.2, Eq. 9).
- ``LastLayerExit``: every token exits at the last layer (plain NAR decoding).
- ``EntropyExit``: hard early exit; a token exits at the first layer whose
  off-ramp entropy (natural log) is below the threshold δ (Eq. 10).
- ``SoftExit``: soft early exit; after every layer but the last, the argmax
  of the off-ramp is embedded and mixed into the state, h~ = W[Embed(ŷ); h]
  (Eq. 11-12); every token is read at the last layer.

Masks are laid out (T, B) like the decoder's hidden states.
"""

import torch

from .canvas import MASK_SYMBOL


def banned_tokens(dictionary, ctc=False):
    """Ids never emitted (they carry no text): ``<pad>``, ``<s>`` and ``<mask>``. Generation and the
    soft-exit argmax in training both ban them, so the embeddings fed upward agree. With ``ctc``
    (``--ctc``), ``<mask>`` is the blank and may be written, and ``</s>``, never a CTC target, is banned."""
    ids = {dictionary.pad(), dictionary.bos()}
    if ctc:
        ids.add(dictionary.eos())
    elif MASK_SYMBOL in dictionary:
        ids.add(dictionary.index(MASK_SYMBOL))
    return sorted(ids)


def ban_tokens(scores, banned):
    """``scores`` (..., V) with the ``banned`` token ids set to -inf: never chosen by an argmax (a copy;
    one slice fill per id, so no index tensor is built and copied to the device on every call)."""
    if not banned:
        return scores
    return fill_banned_(scores.clone(), banned)


def fill_banned_(scores, banned):
    """``scores[..., b] = -inf`` in place for each of the (few) ``banned`` ids; returns ``scores``."""
    for b in banned:
        scores[..., b] = float("-inf")
    return scores


def not_banned(ids, banned):
    """``ids`` is none of the (few) ``banned`` ids: one comparison with a Python int per id, no index
    tensor on the device (``torch.isin`` would need one, copied from the host on every layer)."""
    ok = torch.ones_like(ids, dtype=torch.bool)
    for b in banned:
        ok &= ids.ne(b)
    return ok


def allowed_argmax(scores, banned):
    """``ban_tokens(scores, banned).argmax(-1)`` without copying ``scores``: the best of the
    ``len(banned) + 1`` highest ids that is not banned (one top-k pass over the vocabulary instead of a
    full copy and an argmax; the soft-exit argmax runs on (T, B, V) logits at every layer). Ties are
    broken towards the lower id, as argmax does, among the ids top-k returns."""
    if not banned:
        # on the CPU max's indices follow argmax's first-occurrence rule, ~4x faster on bf16 logits
        return scores.max(-1).indices if scores.device.type == "cpu" else scores.argmax(-1)
    values, ids = scores.topk(len(banned) + 1, dim=-1)
    ok = not_banned(ids, banned)
    best = values.masked_fill(~ok, float("-inf")).amax(-1, keepdim=True)
    return torch.where(ok & values.eq(best), ids, scores.size(-1)).amin(-1)


class ExitPolicy:
    """Base class. Capability flags, read by the decoder and the generator:

    - ``may_stop_early``: tokens may all exit before the last layer (the decoder checks "all exited?");
    - ``plain_last_layer``: every token exits at the last layer and no state is rewritten, so the decoder
      may run its layers without the exit bookkeeping (and the generator may compile that pass);
    - ``last_layer_only``: every token exits at the last layer, its states possibly rewritten between
      layers (``transform``), so without gradient the decoder may skip the exit bookkeeping too;
    - ``predicts``: the pass leaves each token's prediction at its exit layer in ``out`` (``tokens``,
      ``scores``, ``eos_scores``), so the caller need not project the exit states again;
    - ``skips_exited``: nothing is asked of a token once it exited, so without gradient the decoder
      may run each layer (and this policy's exit test) on the running tokens only. The policy is then
      called with the running tokens packed (R, B) and must treat positions independently.
    """

    may_stop_early = False
    plain_last_layer = False
    last_layer_only = False
    predicts = False
    skips_exited = False

    def num_layers_to_run(self, num_layers: int) -> int:
        return num_layers

    def exit_now(self, layer: int, states, decoder):
        """Bool (T, B): tokens whose exit condition holds after ``layer`` (1-based)."""
        raise NotImplementedError

    def __call__(self, layer: int, states, active, is_last: bool, decoder, out):
        """Bool (T, B): the active tokens that exit at ``layer``; all of them at the last."""
        if is_last:
            now = active
            lprobs = None
        else:
            exits, lprobs = self.exit_test(layer, states, decoder)
            now = exits & active
        self.record(layer, states, now, decoder, out, lprobs)
        return now

    def exit_test(self, layer: int, states, decoder):
        """(bool (T, B) exit condition after ``layer``, the off-ramp log-probs it computed or None)."""
        return self.exit_now(layer, states, decoder), None

    def record(self, layer: int, states, now, decoder, out, lprobs):
        """Hook for policies that write predictions made at the exit layer into ``out``."""

    def transform(self, layer: int, states, decoder, out):
        """The states that feed layer ``layer + 1``; unchanged by default."""
        return states


class LastLayerExit(ExitPolicy):
    plain_last_layer = True
    last_layer_only = True

    def exit_now(self, layer, states, decoder):
        return torch.zeros(states.shape[:2], dtype=torch.bool, device=states.device)

    @staticmethod
    def exit_layers(pad, num_layers: int):
        """The exit layers of a last-layer pass, shaped like ``pad``: L everywhere, 0 at padding."""
        return torch.full_like(pad, num_layers, dtype=torch.long).masked_fill(pad, 0)


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

    The decision takes no gradient. With ``keep_predictions`` (generation) it
    keeps the argmax token and its log-probability at each token's exit
    layer, so the generator does not project the states a second time;
    ``banned`` token ids (``<pad>``, ``<s>``, ``<mask>``) are never predicted.
    With ``eos``, the kept argmax excludes ``</s>`` and ``eos_scores`` keeps
    log p(``</s>``) at the exit layer, for the generator's length rules.
    The entropy is that of the full off-ramp distribution.
    """

    may_stop_early = True
    skips_exited = True

    def __init__(self, threshold: float, banned=(), keep_predictions=True, eos=None):
        self.threshold = threshold
        self.banned = list(banned)
        self.predicts = keep_predictions
        self.eos = eos

    def exit_test(self, layer, states, decoder):
        with torch.no_grad():
            lprobs = decoder.off_ramp_log_probs(states, layer)
            entropy = -(lprobs.exp() * lprobs).sum(-1)
        return entropy < self.threshold, lprobs

    def record(self, layer, states, now, decoder, out, lprobs):
        if not self.predicts:
            return
        if lprobs is None:  # the last layer: no exit test ran there
            with torch.no_grad():
                lprobs = decoder.off_ramp_log_probs(states, layer)
        banned = self.banned if self.eos is None else self.banned + [self.eos]
        scores, tokens = ban_tokens(lprobs, banned).max(-1)
        new = {"tokens": tokens, "scores": scores}
        if self.eos is not None:
            new["eos_scores"] = lprobs[..., self.eos]
        for key, value in new.items():
            out[key] = value if key not in out else torch.where(now, value, out[key])


class SoftExit(LastLayerExit):
    """Soft early exit (Eq. 11-12), read at the last layer.

    After layer l < L: ŷ = argmax off-ramp^l(h^l); h~ = W_l [Embed(ŷ); h^l]
    feeds layer l + 1 (no gradient through the argmax). In training, each
    position that has a reference token (``gold_mask``) takes the gold
    token's embedding instead with probability ``gold_prob`` (the released
    code uses 0.3). With ``keep_logits`` the off-ramp logits of layers
    1..L-1 go to ``out["layer_logits"]``, (T, B, V) each (the decoder's
    layout, not copied), for the loss.
    """

    plain_last_layer = False  # it rewrites the states between layers

    def __init__(self, gold=None, gold_mask=None, gold_prob: float = 0.0, keep_logits=False, banned=()):
        if not 0.0 <= gold_prob <= 1.0:
            raise ValueError(f"--soft-gold-prob must lie in [0, 1], got {gold_prob}")
        self.gold = gold.t() if gold is not None else None
        self.gold_mask = gold_mask.t() if gold_mask is not None else None
        self.gold_prob = gold_prob
        self.keep_logits = keep_logits
        self.banned = list(banned)

    def transform(self, layer, states, decoder, out):
        if self.keep_logits:
            logits = decoder.off_ramp(states, layer)
            out.setdefault("layer_logits", []).append(logits)
        with torch.no_grad():
            # without the logits (generation, GLAT's glancing pass): the argmax alone, which the decoder
            # may screen on a low-precision copy of the off-ramp (``off_ramp_argmax``)
            tokens = allowed_argmax(logits, self.banned) if self.keep_logits else decoder.off_ramp_argmax(
                states, layer, self.banned)
            if self.gold is not None and self.gold_prob > 0:
                use_gold = torch.rand(tokens.shape, device=tokens.device) < self.gold_prob
                if self.gold_mask is not None:  # only where a reference token exists
                    use_gold &= self.gold_mask
                tokens = torch.where(use_gold, self.gold, tokens)
        return decoder.soft_mix(tokens, states, layer)
