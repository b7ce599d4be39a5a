"""One-pass early-exit generator for ``elmer_nat`` (paper §4.1, §4.3).

One encoder pass and one decoder pass over the ``<mask>`` canvas, no
iterations and no length predictor. Each token is read at its exit layer:
the last layer, or (hard early exit, Eq. 10) the first layer whose off-ramp
entropy is below δ. The hypothesis is cut at the first ``</s>``.

Hypotheses follow fairseq's format (``tokens`` ending in ``</s>``, ``score``,
``positional_scores``, ``alignment``) so ``fairseq-generate`` and
``fairseq-interactive`` print them as usual, plus ``exit_layers``.
"""

import torch
import torch.nn.functional as F

from .exit_policies import EntropyExit, LastLayerExit, SoftExit


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
    keep = valid & tokens.ne(prev)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    gathered = [t.gather(1, order) for t in (tokens,) + aligned]
    return (gathered[0], keep.sum(1)) + tuple(gathered[1:])


def best_tokens(logits, banned):
    """The argmax token outside ``banned`` and its log-probability under the full softmax,
    without materialising log_softmax over the vocabulary (``logits`` is overwritten)."""
    log_norm = torch.logsumexp(logits, dim=-1)
    best, tokens = logits.index_fill_(-1, logits.new_tensor(banned, dtype=torch.long), float("-inf")).max(-1)
    return best - log_norm, tokens


class EarlyExitGenerator:
    """Args:
        exit_threshold: δ for hard exit; None: the model's own strategy (``--early-exit``),
            0: every token at the last layer.
        collapse: remove consecutive duplicate tokens after generation.
    """

    def __init__(self, tgt_dict, exit_threshold=None, collapse=False, retain_exit_layers=True, compile=False):
        if exit_threshold is not None and exit_threshold < 0:
            raise ValueError(f"--exit-threshold must be >= 0, got {exit_threshold}")
        self.tgt_dict = tgt_dict
        self.eos = tgt_dict.eos()
        self.pad = tgt_dict.pad()
        self.exit_threshold = exit_threshold
        self.collapse = collapse
        self.retain_exit_layers = retain_exit_layers
        self.compile = compile
        self._compiled = {}  # id(model) -> torch.compile'd last-layer forward
        # never emitted: they carry no text
        self.banned = sorted({tgt_dict.pad(), tgt_dict.bos(), tgt_dict.index("<mask>")})

    def make_policy(self, model):
        """The exit rule: --exit-threshold if given, else the checkpoint's --early-exit strategy."""
        strategy = model.cfg.early_exit
        if strategy == "soft":
            if self.exit_threshold:
                raise ValueError("--exit-threshold does not apply to a model trained with --early-exit soft")
            return SoftExit(banned=self.banned)
        threshold = self.exit_threshold
        if threshold is None and strategy == "hard":
            threshold = model.cfg.model_exit_threshold
        if threshold:
            return EntropyExit(threshold, banned=self.banned)
        return LastLayerExit()

    @torch.no_grad()  # not inference_mode: fairseq-generate rescales the scores in place
    def decode(self, model, src_tokens, src_lengths):
        """Tokens, scores and exit layers (each (B, T)) of the whole canvas."""
        canvas = model.initialize_canvas(src_lengths)
        pad = canvas.eq(self.pad)
        policy = self.make_policy(model)
        if self.compile and type(policy) is LastLayerExit:
            logits = self._compiled_forward(model)(src_tokens, src_lengths, canvas)
            exit_layers = LastLayerExit.exit_layers(pad, model.num_exit_layers)
        else:
            states, extra = model(src_tokens, src_lengths, canvas, policy=policy)
            exit_layers = extra["exit_layers"]
            logits = None if isinstance(policy, EntropyExit) else model.decoder.off_ramp(states, model.num_exit_layers)
        if logits is None:  # hard exit read each token at its own exit layer already
            tokens, scores = policy.tokens.t(), policy.scores.t()
        else:
            scores, tokens = best_tokens(logits.float(), self.banned)
        return tokens.masked_fill(pad, self.pad), scores, exit_layers

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
        net_input = sample["net_input"]
        tokens, scores, exit_layers = self.decode(model, net_input["src_tokens"], net_input["src_lengths"])
        lengths = cut_at_first_eos(tokens, self.eos, self.pad)
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
