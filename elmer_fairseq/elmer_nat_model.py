"""``elmer_nat``: the ELMER non-autoregressive encoder-decoder (paper §4.1).

Encoder: fairseq's ``TransformerEncoderBase``. Decoder: a canvas of T
``<mask>`` embeddings plus learned positions (Eq. 4-5), fairseq's
``TransformerDecoderLayerBase`` layers with bidirectional self-attention and
cross-attention, and an off-ramp softmax classifier after every layer
(Eq. 7-8). A token that exits at layer l keeps h^l unchanged in every upper
layer, where it remains a key/value for the tokens still running.
"""

import argparse
import logging
import math
from dataclasses import MISSING, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq import utils
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import (
    FairseqDecoder,
    FairseqEncoderDecoderModel,
    register_model,
    register_model_architecture,
)
from fairseq.models.transformer import TransformerConfig, TransformerEncoderBase
from fairseq.modules import FairseqDropout, LayerNorm, PositionalEmbedding
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase
from fairseq.modules.transformer_sentence_encoder import init_bert_params
from fairseq.utils import safe_getattr
from omegaconf import II, DictConfig, OmegaConf, open_dict

from .canvas import LONG_TARGET_CHOICES, MASK_SYMBOL, POST_EOS_CHOICES, canvas_lengths, make_canvas
from .exit_policies import AssignedExit, ExitPolicy, LastLayerExit, allowed_argmax
from .exit_strategies import EARLY_EXIT_HELP, STRATEGIES, strategy_of
from .screened_argmax import LowPrecisionWeight, ScreenStats, screened_argmax
from .option_checks import add_checked_args, add_refused_args, at_least, check_fields, within

logger = logging.getLogger(__name__)


@dataclass
class ElmerNATConfig(FairseqDataclass):
    """Defaults are BART-base's shape, so BART-base weights fit (paper §5.1)."""

    activation_fn: ChoiceEnum(utils.get_available_activation_fns()) = field(
        default="gelu", metadata={"help": "activation function"}
    )
    dropout: float = field(default=0.1, metadata={"help": "dropout probability", "check": within(0, 1, True)})
    attention_dropout: float = field(
        default=0.1, metadata={"help": "dropout on attention weights", "check": within(0, 1, True)}
    )
    activation_dropout: float = field(
        default=0.0, metadata={"help": "dropout after the FFN activation", "check": within(0, 1, True)}
    )
    encoder_embed_dim: int = field(default=768, metadata={"help": "encoder embedding dimension"})
    encoder_ffn_embed_dim: int = field(default=3072, metadata={"help": "encoder FFN dimension"})
    encoder_layers: int = field(default=6, metadata={"help": "encoder layers", "check": at_least(1)})
    encoder_attention_heads: int = field(default=12, metadata={"help": "encoder attention heads"})
    encoder_normalize_before: bool = field(
        default=False, metadata={"help": "pre-norm encoder layers (BART is post-norm)"}
    )
    sinusoidal_encoder_positions: bool = field(
        default=False,
        metadata={"help": "sinusoidal encoder positions instead of learned ones (the decoder's are always learned)"},
    )
    decoder_embed_dim: int = field(default=768, metadata={"help": "decoder embedding dimension"})
    decoder_ffn_embed_dim: int = field(default=3072, metadata={"help": "decoder FFN dimension"})
    decoder_layers: int = field(
        default=6, metadata={"help": "decoder layers L; each has an off-ramp, so L exit layers", "check": at_least(1)}
    )
    decoder_attention_heads: int = field(default=12, metadata={"help": "decoder attention heads"})
    decoder_normalize_before: bool = field(
        default=False,
        metadata={"help": "pre-norm decoder layers; a shared final layer norm then precedes every off-ramp"},
    )
    # fairseq turns a bool option into a flag that flips its default, so every bool here
    # defaults to False and names the departure from BART-base.
    no_layernorm_embedding: bool = field(default=False, metadata={"help": "no layer norm on the embeddings"})
    layernorm_embedding: bool = field(
        default=False,
        metadata={"help": "accepted as in fairseq's command lines: elmer_nat normalises the embeddings unless "
                  "--no-layernorm-embedding (giving both is refused)"},
    )
    scale_embedding: bool = field(
        default=False, metadata={"help": "scale embeddings by sqrt(dim) (BART does not)"}
    )
    no_scale_embedding: bool = field(
        default=False,
        metadata={"help": "accepted as in fairseq's command lines: elmer_nat scales no embedding unless "
                  "--scale-embedding (giving both is refused)"},
    )
    no_share_all_embeddings: bool = field(
        default=False,
        metadata={
            "help": "separate encoder and decoder embeddings; by default encoder, decoder and the "
            "off-ramp share one matrix (needs fairseq-preprocess --joined-dictionary)"
        },
    )
    share_all_embeddings: bool = field(
        default=False,
        metadata={
            "help": "accepted as in fairseq's transformer command lines: elmer_nat always shares encoder, decoder "
            "and off-ramp embeddings unless --no-share-all-embeddings (giving both is refused)"
        },
    )
    share_decoder_input_output_embed: bool = field(
        default=False,
        metadata={"help": "accepted as in fairseq's transformer command lines: the (last) off-ramp is always the "
                  "decoder's embedding matrix"},
    )
    encoder_learned_pos: bool = field(
        default=False,
        metadata={"help": "accepted as in fairseq's NAT command lines: the encoder's positions are learned unless "
                  "--sinusoidal-encoder-positions (giving both is refused)"},
    )
    decoder_learned_pos: bool = field(
        default=False,
        metadata={"help": "accepted as in fairseq's NAT command lines: the decoder's positions are always learned"},
    )
    apply_bert_init: bool = field(
        default=False,
        metadata={"help": "initialise every Linear and Embedding as BERT (normal, std 0.02), as fairseq's NAT "
                  "models do with this flag; leaves a --restore-file/--init-from-bart checkpoint's weights alone"},
    )
    per_layer_off_ramps: bool = field(
        default=False,
        metadata={"help": "one off-ramp classifier W_c^l per decoder layer (Eq. 8) instead of one shared"},
    )
    exit_copy_grad: bool = field(
        default=False,
        metadata={
            "help": "let gradients flow through the state an exited token passes to upper layers "
            "(the released ELMER code detaches it; default: detached)"
        },
    )
    early_exit: ChoiceEnum(list(STRATEGIES)) = field(default="lplm", metadata={"help": EARLY_EXIT_HELP})
    model_exit_threshold: float = field(
        default=0.5,
        metadata={
            "help": "hard early exit: the entropy threshold δ (natural log) in training and, by default, generation",
            "check": at_least(0),
        },
    )
    hard_all_layer_loss: bool = field(
        default=False,
        metadata={"help": "hard early exit: add the mean loss of every layer (deep supervision) to the exit-layer loss"},
    )
    soft_gold_prob: float = field(
        default=0.3,
        metadata={
            "help": "soft early exit: in training, the probability that a position feeds the gold token's embedding",
            "check": within(0, 1),
        },
    )
    per_layer_soft_mix: bool = field(
        default=False,
        metadata={"help": "soft early exit: one W (2d -> d, Eq. 12) per layer instead of one shared"},
    )
    canvas_len_a: float = field(
        default=1.0, metadata={"help": "canvas length T = floor(a * source length + b): the a", "check": at_least(0)}
    )
    canvas_len_b: int = field(
        default=10, metadata={"help": "canvas length T = floor(a * source length + b): the b"}
    )
    post_eos: ChoiceEnum(POST_EOS_CHOICES) = field(
        default="ignore",
        metadata={"help": "positions after </s>: not trained (ignore), or taught to emit <pad> or </s>"},
    )
    ctc: bool = field(
        default=False,
        metadata={"help": "CTC over the canvas (ctc.py): every position writes a token or the blank (<mask>), the "
                  "output merges repeats and drops blanks, so its length comes from the one pass (no </s> cut, "
                  "no --length-rule); trained with the CTC loss at every off-ramp the strategy trains. Give a "
                  "canvas longer than the targets (--canvas-len-a/-b; the recipes: 1.5x the p99 target length)"},
    )
    long_target: ChoiceEnum(LONG_TARGET_CHOICES) = field(
        default="truncate",
        metadata={"help": "training targets longer than their canvas: cut them, or leave them out of the loss; counted"},
    )
    max_source_positions: int = II("task.max_source_positions")
    max_target_positions: int = II("task.max_target_positions")


_NO_LENGTH = "elmer_nat predicts no length: each output ends at the first </s> of its one pass (see --length-rule)"
_NOT_IMPLEMENTED = "not implemented in elmer_nat"
# fairseq transformer / NAT model flags that elmer_nat cannot honour: refused at parse time, never ignored
REFUSED_FLAGS = {
    "--pred-length-offset": _NO_LENGTH,
    "--length-loss-factor": _NO_LENGTH,
    "--sg-length-pred": _NO_LENGTH,
    "--src-embedding-copy": "elmer_nat's decoder input is the <mask> canvas, not a copy of the source embeddings",
    "--no-token-positional-embeddings": "the <mask> canvas carries nothing but positions; the decoder needs them",
    "--adaptive-softmax-cutoff": "every off-ramp is a full softmax over the target dictionary (exit needs its entropy)",
    "--adaptive-softmax-dropout": "every off-ramp is a full softmax over the target dictionary",
    "--tie-adaptive-weights": "every off-ramp is a full softmax over the target dictionary",
    "--encoder-layerdrop": _NOT_IMPLEMENTED,
    "--decoder-layerdrop": _NOT_IMPLEMENTED + " (every decoder layer is an exit point)",
    "--no-cross-attention": "the decoder reads the source only through cross-attention",
    "--cross-self-attention": _NOT_IMPLEMENTED,
    "--checkpoint-activations": _NOT_IMPLEMENTED,
    "--offload-activations": _NOT_IMPLEMENTED,
    "--quant-noise-pq": _NOT_IMPLEMENTED,
    "--decoder-output-dim": "the off-ramps read the decoder's --decoder-embed-dim states",
    "--decoder-input-dim": "the canvas embeddings have --decoder-embed-dim",
}


def _transformer_config(cfg) -> TransformerConfig:
    """fairseq's TransformerConfig from our flat config (DictConfig, dataclass or Namespace)."""
    if isinstance(cfg, DictConfig):
        ns = argparse.Namespace(**OmegaConf.to_container(cfg, resolve=True))
    else:
        ns = argparse.Namespace(**vars(cfg))
    ns.layernorm_embedding = not cfg.no_layernorm_embedding
    ns.no_scale_embedding = not cfg.scale_embedding
    ns.share_all_embeddings = not cfg.no_share_all_embeddings
    ns.encoder_learned_pos = not cfg.sinusoidal_encoder_positions
    ns.decoder_learned_pos = True
    return TransformerConfig.from_namespace(ns)


def fill_defaults(cfg):
    """Add options a checkpoint predates, with their defaults (logged), so older checkpoints load."""
    if not isinstance(cfg, DictConfig):
        return cfg
    added = []
    with open_dict(cfg):
        for fld in fields(ElmerNATConfig):
            if fld.name not in cfg and fld.default is not MISSING and not str(fld.default).startswith("${"):
                cfg[fld.name] = fld.default
                added.append(f"{fld.name}={fld.default}")
    if added:
        logger.info("model options absent from the checkpoint, set to their defaults: " + ", ".join(added))
    return cfg


def check_config(cfg):
    """Reject nonsense options at start, naming the flag."""
    if cfg.share_all_embeddings and cfg.no_share_all_embeddings:
        raise ValueError("--share-all-embeddings and --no-share-all-embeddings contradict each other; give one")
    for yes, no in (("encoder_learned_pos", "sinusoidal_encoder_positions"), ("layernorm_embedding", "no_layernorm_embedding"),
                    ("no_scale_embedding", "scale_embedding")):
        if getattr(cfg, yes, False) and getattr(cfg, no, False):
            raise ValueError(f"--{yes.replace('_', '-')} and --{no.replace('_', '-')} contradict each other; give one")
    check_fields(cfg, ElmerNATConfig)
    if cfg.ctc and cfg.post_eos != "ignore":
        raise ValueError(f"--post-eos {cfg.post_eos} does not apply with --ctc (its output has no </s> to train "
                         "positions after); leave --post-eos at ignore")
    if math.floor(cfg.canvas_len_b + cfg.canvas_len_a) < 1:
        raise ValueError(
            f"--canvas-len-a {cfg.canvas_len_a} --canvas-len-b {cfg.canvas_len_b} give a canvas "
            "of length < 1 for a one-token source"
        )


@register_model("elmer_nat", dataclass=ElmerNATConfig)
class ElmerNATModel(FairseqEncoderDecoderModel):
    """ELMER: NAR Transformer with token-level early exit (paper §4)."""

    def __init__(self, cfg, encoder, decoder):
        super().__init__(encoder, decoder)
        self.cfg = cfg

    @classmethod
    def add_args(cls, parser):
        # no defaults here, as fairseq's own add_args: the architecture's defaults fill them in
        add_checked_args(parser, ElmerNATConfig, delete_default=True)
        add_refused_args(parser, REFUSED_FLAGS)

    @classmethod
    def build_model(cls, cfg, task):
        cfg = fill_defaults(cfg)
        check_config(cfg)
        src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
        if MASK_SYMBOL not in tgt_dict:
            raise ValueError(f"the target dictionary has no {MASK_SYMBOL} symbol; use --task nat_early_exit, which adds it")
        tcfg = _transformer_config(cfg)
        if tcfg.share_all_embeddings:
            if src_dict != tgt_dict:
                raise ValueError(
                    "shared embeddings need a joined dictionary (fairseq-preprocess --joined-dictionary), "
                    "or pass --no-share-all-embeddings"
                )
            if cfg.encoder_embed_dim != cfg.decoder_embed_dim:
                raise ValueError("shared embeddings need --encoder-embed-dim equal to --decoder-embed-dim")
            enc_emb = dec_emb = nn.Embedding(len(src_dict), cfg.encoder_embed_dim, src_dict.pad())
        else:
            enc_emb = nn.Embedding(len(src_dict), cfg.encoder_embed_dim, src_dict.pad())
            dec_emb = nn.Embedding(len(tgt_dict), cfg.decoder_embed_dim, tgt_dict.pad())
        for emb in {id(enc_emb): enc_emb, id(dec_emb): dec_emb}.values():
            nn.init.normal_(emb.weight, mean=0, std=emb.embedding_dim**-0.5)
            nn.init.constant_(emb.weight[emb.padding_idx], 0)
        encoder = TransformerEncoderBase(tcfg, src_dict, enc_emb)
        decoder = ElmerDecoder(cfg, tcfg, tgt_dict, dec_emb)
        model = cls(cfg, encoder, decoder)
        if cfg.apply_bert_init:
            model.apply(init_bert_params)
        return model

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """Refuse a checkpoint of another dictionary size, naming both; fine-tuning an lplm/hard
        checkpoint with --early-exit soft starts the new W from its init."""
        own = self.state_dict()
        key = "encoder.embed_tokens.weight"
        if key in state_dict and key in own and state_dict[key].shape != own[key].shape:
            raise ValueError(
                f"the checkpoint's embeddings are {tuple(state_dict[key].shape)} but this task's dictionary "
                f"gives {tuple(own[key].shape)} ({own[key].shape[0]} symbols, <mask> included): the checkpoint "
                "was trained on another dictionary; use the data-bin (dict.*.txt) it was trained with"
            )
        added = [k for k in own if k.startswith("decoder.soft_mixers.") and k not in state_dict]
        if added:
            state_dict = dict(state_dict, **{k: own[k] for k in added})
            logger.info(f"checkpoint has no soft-exit W; initialised {len(added)} tensor(s) fresh")
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    @property
    def num_exit_layers(self) -> int:
        return len(self.decoder.layers)

    def initialize_canvas(self, src_lengths):
        """The (B, T) ``<mask>`` canvas for a batch; T follows the length rule only."""
        lengths = canvas_lengths(
            src_lengths, self.cfg.canvas_len_a, self.cfg.canvas_len_b, self.decoder.max_positions()
        )
        return make_canvas(lengths, self.decoder.mask_idx, self.decoder.padding_idx)

    def forward(self, src_tokens, src_lengths, prev_output_tokens, exit_layers=None, policy=None, return_all_hiddens=False,
                encoder_out=None):
        """Encode once and decode the canvas ``prev_output_tokens``.

        ``prev_output_tokens`` may hold k canvases per source (k*B rows, as
        LPLM's samples): the encoder output is then repeated k times rather
        than recomputed. ``exit_layers`` (k*B, T) in 1..L selects
        ``AssignedExit``; otherwise ``policy`` (default: last layer).
        ``encoder_out``: this batch's encoder output, computed by the caller (GLAT's two decoder passes
        share one encoder pass).
        """
        if encoder_out is None:
            encoder_out = self.encoder(src_tokens, src_lengths=src_lengths)
        bsz = src_tokens.size(0)
        if prev_output_tokens.size(0) != bsz:
            k = prev_output_tokens.size(0) // bsz
            if k * bsz != prev_output_tokens.size(0):
                raise ValueError("the canvas batch must be a multiple of the source batch")
            order = torch.arange(bsz, device=src_tokens.device).repeat_interleave(k)
            encoder_out = self.encoder.reorder_encoder_out(encoder_out, order)
        if exit_layers is not None:
            policy = AssignedExit(exit_layers)
        return self.decoder(prev_output_tokens, encoder_out, policy=policy, return_all_hiddens=return_all_hiddens)


class ElmerDecoder(FairseqDecoder):
    """NAR decoder with an off-ramp at every layer and token-level exit."""

    def __init__(self, cfg, tcfg: TransformerConfig, dictionary, embed_tokens):
        super().__init__(dictionary)
        embed_dim = cfg.decoder_embed_dim
        self.padding_idx = dictionary.pad()
        self.mask_idx = dictionary.index(MASK_SYMBOL)
        self.max_target_positions = cfg.max_target_positions
        self.exit_copy_grad = cfg.exit_copy_grad
        self.embed_tokens = embed_tokens
        self.embed_scale = math.sqrt(embed_dim) if cfg.scale_embedding else 1.0
        self.embed_positions = PositionalEmbedding(
            cfg.max_target_positions, embed_dim, self.padding_idx, learned=True
        )
        self.layernorm_embedding = None if cfg.no_layernorm_embedding else LayerNorm(embed_dim)
        self.dropout_module = FairseqDropout(cfg.dropout, module_name=self.__class__.__name__)
        self.layers = nn.ModuleList(
            [TransformerDecoderLayerBase(tcfg, no_encoder_attn=False) for _ in range(cfg.decoder_layers)]
        )
        # pre-norm layers leave un-normalised states: normalise before every off-ramp
        self.ramp_norm = LayerNorm(embed_dim) if cfg.decoder_normalize_before else None
        num_ramps = cfg.decoder_layers if cfg.per_layer_off_ramps else 1
        self.off_ramps = nn.ModuleList(
            [nn.Linear(embed_dim, len(dictionary), bias=False) for _ in range(num_ramps)]
        )
        for ramp in self.off_ramps:
            nn.init.normal_(ramp.weight, mean=0, std=embed_dim**-0.5)
        # the (last) off-ramp is the embedding matrix, as in BART and the released ELMER
        self.off_ramps[-1].weight = self.embed_tokens.weight
        self._low_precision_ramps = {}  # off-ramp index -> LowPrecisionWeight, for off_ramp_argmax
        self.screen_stats = ScreenStats()
        self.soft_mixers = None
        if strategy_of(cfg).soft_mix and cfg.decoder_layers > 1:
            num_mix = cfg.decoder_layers - 1 if cfg.per_layer_soft_mix else 1
            self.soft_mixers = nn.ModuleList([nn.Linear(2 * embed_dim, embed_dim, bias=False) for _ in range(num_mix)])
            for mix in self.soft_mixers:
                init_soft_mix(mix.weight, embed_dim)

    # hard exit at inference runs the layers on the running tokens only (``_layer_on_running``); False:
    # every token through every layer, masked (what training does; scripts/benchmark.py times both)
    skip_exited = True
    # soft exit's inner argmax on CPU in fp32: screened on a bf16 copy of the off-ramp, the same tokens
    # (``off_ramp_argmax``); False: the full fp32 projection (scripts/benchmark.py times both)
    screen_argmax = True

    def max_positions(self):
        return self.max_target_positions

    def embed(self, canvas):
        """Eq. 5: h^0 = Embed([MASK]) + position, as (T, B, C)."""
        x = self.embed_scale * self.embed_tokens(canvas) + self.embed_positions(canvas)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return self.dropout_module(x).transpose(0, 1)

    def _ramp_index(self, layer: int):
        return layer - 1 if len(self.off_ramps) > 1 else 0

    def off_ramp(self, states, layer: int):
        """Eq. 8 logits W_c^l h^l for states from layer ``layer`` (1-based), any leading shape."""
        if self.ramp_norm is not None:
            states = self.ramp_norm(states)
        return self.off_ramps[self._ramp_index(layer)](states)

    def off_ramp_argmax(self, states, layer: int, banned=()):
        """``argmax`` of ``off_ramp(states, layer)`` outside ``banned``, ties to the lower id (no gradient
        flows through it). On CPU, in fp32 (with ``screen_argmax``): screened on a bf16 copy of the
        off-ramp (``screened_argmax``: the same token, half the bytes read); else the full projection."""
        index = self._ramp_index(layer)
        ramp = self.off_ramps[index]
        if (self.screen_argmax and states.device.type == "cpu"
                and states.dtype == torch.float32 and ramp.weight.dtype == torch.float32):
            if self.ramp_norm is not None:
                states = self.ramp_norm(states)
            copy = self._low_precision_ramps.setdefault(index, LowPrecisionWeight())
            low, max_row_norm = copy.get(ramp.weight)
            return screened_argmax(states, ramp.weight, low, max_row_norm, banned, stats=self.screen_stats)
        return allowed_argmax(self.off_ramp(states, layer), banned)

    def off_ramp_log_probs(self, states, layer: int):
        return F.log_softmax(self.off_ramp(states, layer).float(), dim=-1)

    def soft_mix(self, tokens, states, layer: int):
        """Eq. 12: h~ = W [Embed(ŷ); h] for the states of layer ``layer``, any leading shape."""
        emb = self.embed_scale * self.embed_tokens(tokens)
        mix = self.soft_mixers[layer - 1] if len(self.soft_mixers) > 1 else self.soft_mixers[0]
        return mix(torch.cat([emb, states], dim=-1))

    def project(self, states, layers):
        """Logits of states (N, C) each at its own exit layer ``layers`` (N,), in 1..L.

        With one shared off-ramp this is a single projection; per-layer
        off-ramps loop over the L layers (never over tokens).
        """
        if len(self.off_ramps) == 1:
            return self.off_ramp(states, 1)
        out = states.new_empty(states.shape[:-1] + (len(self.dictionary),))
        for layer in range(1, len(self.layers) + 1):
            sel = layers.eq(layer)
            out[sel] = self.off_ramp(states[sel], layer)
        return out

    def forward(self, canvas, encoder_out, policy: ExitPolicy = None, return_all_hiddens=False):
        """Run the layers with token-level exit.

        Returns ``(exit_states, extra)``: exit_states (B, T, C) holds h^{l_t}
        of every token t at its exit layer l_t (the state Eq. 9 scores), and
        ``extra["exit_layers"]`` (B, T) the l_t (0 at padding), and
        ``extra["predictions"]`` what the policy produced: a predicting policy's
        ``tokens``/``scores``/``eos_scores`` (B, T) at each token's exit layer,
        soft exit's ``layer_logits`` (a list of (T, B, V), as computed). With
        ``return_all_hiddens``, ``extra["inner_states"]`` lists the (T, B, C)
        states after the embedding and after each layer that ran (an exited
        token's carried state), and ``extra["layer_outputs"]`` each layer's
        own output for every token (exited ones included: what that layer's
        off-ramp would read there).
        """
        policy = policy if policy is not None else LastLayerExit()
        num_layers = len(self.layers)
        last = policy.num_layers_to_run(num_layers)
        x = self.embed(canvas)
        pad = canvas.eq(self.padding_idx)
        enc = encoder_out["encoder_out"][0] if encoder_out["encoder_out"] else None
        enc_pad = encoder_out["encoder_padding_mask"][0] if encoder_out["encoder_padding_mask"] else None
        self_pad = pad if pad.any() else None

        if not return_all_hiddens and (policy.plain_last_layer or policy.last_layer_only and not torch.is_grad_enabled()):
            out = {}
            states, exit_layers = self._last_layer_pass(x, enc, enc_pad, self_pad, pad, num_layers, policy, out)
            return states, {"exit_layers": exit_layers, "inner_states": None, "layer_outputs": None,
                            "predictions": batch_first(out)}
        # hard exit at inference: each layer runs on the running tokens only (``_layer_on_running``)
        skip = policy.skips_exited and self.skip_exited and not return_all_hiddens and not torch.is_grad_enabled()

        done = pad.t()  # (T, B): padding counts as exited
        exit_layer = torch.zeros_like(done, dtype=torch.long)
        exit_state = torch.zeros_like(x)
        inner_states = [x] if return_all_hiddens else None
        layer_outputs = [] if return_all_hiddens else None
        out = {}  # what the policy produces during this pass
        for idx in range(last):
            layer = idx + 1
            running = ~done
            counts = running.sum(0) if skip else None
            # with skip, the one host sync of a layer is the largest running count: 0 is "all exited"
            width = int(counts.max()) if skip else x.size(0)
            if width == 0:
                break
            if width < x.size(0):
                y, now = self._layer_on_running(idx, x, enc, enc_pad, self_pad, policy, running, counts, width,
                                                layer == last, out)
            else:
                y, _, _ = self.layers[idx](
                    x, enc, enc_pad, self_attn_padding_mask=self_pad, need_attn=False
                )
                now = policy(layer, y, running, layer == last, self, out)
            exit_state = torch.where(now[..., None], y, exit_state)
            exit_layer = exit_layer.masked_fill(now, layer)
            done = done | now
            # an exited token passes its exit state, unchanged, to every upper layer
            carried = exit_state if self.exit_copy_grad else exit_state.detach()
            x = torch.where(done[..., None], carried, y)
            if return_all_hiddens:
                inner_states.append(x)
                layer_outputs.append(y)
            if layer < last:
                if policy.may_stop_early and not skip and bool(done.all()):
                    break
                x = policy.transform(layer, x, self, out)
        predictions = batch_first(out)
        extra = {"exit_layers": exit_layer.t(), "inner_states": inner_states, "layer_outputs": layer_outputs,
                 "predictions": predictions}
        return exit_state.transpose(0, 1), extra

    def _layer_on_running(self, idx, x, enc, enc_pad, self_pad, policy, running, counts, width, is_last, out):
        """Layer ``idx + 1`` for a policy whose exited tokens need no more work (hard exit at inference,
        no gradient): the queries (self-attention, cross-attention, FFN) and the policy's exit test run
        only for the running tokens, packed per sentence to ``width``, the batch's largest running
        count; keys and values come from every token (an exited one carries its exit state). Returns
        the layer's output (exited tokens keep their input state) and who exits, (T, B), as the full
        layer would give; the policy's predictions are spread back into ``out``."""
        T, B, C = x.shape
        # running positions first in each column (a stable sort keeps their order)
        order = (~running).to(torch.uint8).argsort(dim=0, stable=True)[:width]  # (width, B)
        live = torch.arange(width, device=x.device)[:, None] < counts[None, :]
        xq = x.gather(0, order[..., None].expand(width, B, C))
        yq = run_layer_for_queries(self.layers[idx], xq, x, enc, enc_pad, self_pad)
        found = {}
        now_q = policy(idx + 1, yq, live, is_last, self, found) & live
        now = torch.zeros_like(running).scatter(0, order, now_q)
        y = x.scatter(0, order[..., None].expand(width, B, C), torch.where(live[..., None], yq, xq))
        for key, value in found.items():
            spread = value.new_zeros((T, B)).scatter(0, order, value)
            out[key] = spread if key not in out else torch.where(now, spread, out[key])
        return y, now

    def _last_layer_pass(self, x, enc, enc_pad, self_pad, pad, num_layers, policy, out):
        """Every token at the last layer: the layers and the policy's ``transform`` between them (soft
        exit's Eq. 12), without the exit bookkeeping. Equal to the general loop at every non-padding
        position (the general loop zeroes padding states between layers, which attention masks out;
        the returned padding states are zeroed, as there)."""
        for idx, layer in enumerate(self.layers):
            x, _, _ = layer(x, enc, enc_pad, self_attn_padding_mask=self_pad, need_attn=False)
            if idx + 1 < num_layers and not policy.plain_last_layer:
                x = policy.transform(idx + 1, x, self, out)
        states = x.transpose(0, 1).masked_fill(pad[..., None], 0.0)
        return states, LastLayerExit.exit_layers(pad, num_layers)


def batch_first(out):
    """A policy's predictions, (T, B) as the layer loop made them, as (B, T); soft exit's
    ``layer_logits`` stay (T, B, V), as computed."""
    return {key: value if key == "layer_logits" else value.t() for key, value in out.items()}


def run_layer_for_queries(layer, xq, x, enc, enc_pad, self_pad):
    """fairseq's ``TransformerDecoderLayer.forward`` (no incremental state, eval mode) with the queries
    ``xq`` (R, B, C) apart from the keys/values ``x`` (T, B, C) of self-attention: the output of the
    layer at the R query positions, as a full pass would give there."""
    if layer.cross_self_attention:
        raise ValueError("work-skipping hard exit does not support --cross-self-attention")
    kv = layer.self_attn_layer_norm(x) if layer.normalize_before else x
    residual = xq
    h = layer.self_attn_layer_norm(xq) if layer.normalize_before else xq
    h, _ = layer.self_attn(query=h, key=kv, value=kv, key_padding_mask=self_pad, need_weights=False)
    if layer.c_attn is not None:
        R, B = h.shape[:2]
        h = torch.einsum("tbhd,h->tbhd", h.view(R, B, layer.nh, layer.head_dim), layer.c_attn).reshape(R, B, -1)
    if layer.attn_ln is not None:
        h = layer.attn_ln(h)
    h = layer.residual_connection(layer.dropout_module(h), residual)
    if not layer.normalize_before:
        h = layer.self_attn_layer_norm(h)
    if layer.encoder_attn is not None and enc is not None:
        residual = h
        if layer.normalize_before:
            h = layer.encoder_attn_layer_norm(h)
        h, _ = layer.encoder_attn(query=h, key=enc, value=enc, key_padding_mask=enc_pad, static_kv=True,
                                  need_weights=False)
        h = layer.residual_connection(layer.dropout_module(h), residual)
        if not layer.normalize_before:
            h = layer.encoder_attn_layer_norm(h)
    residual = h
    if layer.normalize_before:
        h = layer.final_layer_norm(h)
    h = layer.activation_dropout_module(layer.activation_fn(layer.fc1(h)))
    if layer.ffn_layernorm is not None:
        h = layer.ffn_layernorm(h)
    h = layer.dropout_module(layer.fc2(h))
    if layer.w_resid is not None:
        residual = torch.mul(layer.w_resid, residual)
    h = layer.residual_connection(h, residual)
    if not layer.normalize_before:
        h = layer.final_layer_norm(h)
    return h


def init_soft_mix(weight, dim):
    """W = [W_e | I]: starts as the identity on h plus a small embedding term."""
    with torch.no_grad():
        nn.init.normal_(weight[:, :dim], mean=0, std=0.02)
        weight[:, dim:].copy_(torch.eye(dim))


@register_model_architecture("elmer_nat", "elmer_nat_tiny")
def elmer_nat_tiny(args):
    """A tiny preset for tests and the CPU demo."""
    args.encoder_embed_dim = safe_getattr(args, "encoder_embed_dim", 128)
    args.encoder_ffn_embed_dim = safe_getattr(args, "encoder_ffn_embed_dim", 512)
    args.encoder_layers = safe_getattr(args, "encoder_layers", 3)
    args.encoder_attention_heads = safe_getattr(args, "encoder_attention_heads", 4)
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 128)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 512)
    args.decoder_layers = safe_getattr(args, "decoder_layers", 3)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 4)
