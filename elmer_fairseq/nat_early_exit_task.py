"""``nat_early_exit``: sequence-to-sequence task for ELMER.

Reads ``fairseq-preprocess`` pair data like ``translation``, adds ``<mask>``
to the dictionaries when they lack it, counts and logs truncated sources, and
returns the one-pass early-exit generator, so stock ``fairseq-generate`` and
``fairseq-interactive`` work with no extra flags.
"""

import atexit
import io
import logging
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from fairseq import metrics, utils
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from .early_exit_generator import LENGTH_RULES, EarlyExitGenerator
from .generation_io import ExitLayerReport, Utf8Guard
from .canvas import MASK_SYMBOL
from .option_checks import add_checked_args, at_least, check_fields

logger = logging.getLogger(__name__)


@dataclass
class NATEarlyExitConfig(TranslationConfig):
    exit_threshold: Optional[float] = field(
        default=None,
        metadata={
            "help": "hard early exit at generation (Eq. 10): a token exits at the first decoder layer whose "
            "off-ramp entropy (natural log) is below this threshold; 0: every token exits at the last layer; "
            "unset: the checkpoint's --early-exit strategy (hard: its --model-exit-threshold)",
            "check": at_least(0),
        },
    )
    noise: ChoiceEnum(["full_mask"]) = field(
        default="full_mask",
        metadata={"help": "accepted as in fairseq's translation_lev command lines: ELMER's decoder input is all "
                  "<mask> (full_mask); the other translation_lev noises do not apply to it"},
    )
    collapse_repeats: bool = field(
        default=False, metadata={"help": "remove consecutive duplicate tokens from generated hypotheses"}
    )
    length_rule: ChoiceEnum(LENGTH_RULES) = field(
        default="first-eos",
        metadata={
            "help": "generation: where each output ends, read from the per-position p(</s>) of the one pass "
            "(never the reference): first-eos, the first position whose argmax is </s>; mode / median / "
            "quantile, the most probable length / the median / the --length-quantile quantile of the length "
            "distribution those probabilities define (interpreted by the checkpoint's --post-eos); the "
            "positions before it take their best token other than </s>"
        },
    )
    length_quantile: float = field(
        default=0.5,
        metadata={"help": "generation, --length-rule quantile: the output ends at the first length whose cumulative "
                  "probability reaches this (0.5: the median; higher: longer outputs); "
                  "elmer_fairseq/length_calibration.py --rule quantile picks it on training pairs"},
    )
    eos_penalty: float = field(
        default=0.0,
        metadata={"help": "generation, --length-rule first-eos: subtract this from log p(</s>) before the argmax "
                  "(> 0 gives longer outputs)"},
    )
    blank_penalty: float = field(
        default=0.0,
        metadata={"help": "generation, a model trained with --ctc: subtract this from log p(blank) before each "
                  "position's argmax (> 0: fewer blanks, longer outputs); elmer_fairseq/length_calibration.py "
                  "--rule blank-penalty picks it on training pairs"},
    )
    no_repeat_neighbours: int = field(
        default=0,
        metadata={"help": "generation, last-layer or soft exit: K >= 2 keeps neighbouring positions from writing "
                  "the same token where one of them has another among its K best (the less confident one moves "
                  "down its list, K - 1 vectorised rounds), before the length rule; 0: off"},
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "generation: torch.compile the encoder + decoder + last off-ramp for last-layer decoding "
            "(low-latency serving); the first batches compile (seconds to minutes); hard/soft exit unchanged"
        },
    )
    autocast_bf16: bool = field(
        default=False,
        metadata={
            "help": "training and validation: the forward pass and the loss run under torch.autocast with bfloat16 "
            "(CPU or CUDA): matrix products in bf16, parameters, gradients and optimizer state in fp32 (no loss "
            "scaling needed). On CPUs with AVX512-BF16/AMX the off-ramps' vocabulary products get several times "
            "faster (scripts/train_speed.py). Generation is not affected"
        },
    )
    bf16_generation: bool = field(
        default=False,
        metadata={
            "help": "generation: the model runs in bfloat16, its weights cast once at the first batch (as "
            "fairseq-generate's --fp16 casts to half); scores stay fp32. On CPUs with AVX512-BF16/AMX: the debsum "
            "CTC student 1.47x faster at batch 1 (scripts/benchmark.py --bf16-generation-too), 153 of 1,715 valid "
            "outputs changed, ROUGE kept (README). Validation (--eval-rouge) stays in fp32"
        },
    )
    eval_rouge: bool = field(
        default=False,
        metadata={
            "help": "validation also generates with the early-exit generator and logs ROUGE-L F1 (x100) as "
            "'rougeL', so that --best-checkpoint-metric rougeL --maximize-best-checkpoint-metric keeps the "
            "best checkpoint by it; pieces are joined by --eval-bleu-remove-bpe (e.g. sentencepiece), GPT-2 "
            "ids are scored as tokens"
        },
    )
    print_exit_layers: bool = field(
        default=False,
        metadata={
            "help": "fairseq-generate/-interactive: print each hypothesis token's exit layer (E- lines) "
            "and, at the end, the fraction of tokens exiting at each layer and the mean exit layer"
        },
    )


def _raw_sizes(dataset):
    """Token counts of the binarized data under fairseq's wrapper datasets."""
    if hasattr(dataset, "datasets"):  # ConcatDataset of shards
        return np.concatenate([_raw_sizes(d) for d in dataset.datasets])
    while hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return np.asarray(dataset.sizes)


@register_task("nat_early_exit", dataclass=NATEarlyExitConfig)
class NATEarlyExitTask(TranslationTask):
    cfg: NATEarlyExitConfig

    @classmethod
    def add_args(cls, parser):
        add_checked_args(parser, NATEarlyExitConfig)

    def __init__(self, cfg, src_dict, tgt_dict):
        check_fields(cfg, NATEarlyExitConfig)
        for name, dictionary in (("source", src_dict), ("target", tgt_dict)):
            if MASK_SYMBOL not in dictionary:
                dictionary.add_symbol(MASK_SYMBOL)
                logger.info(f"added {MASK_SYMBOL} to the {name} dictionary (index {dictionary.index(MASK_SYMBOL)})")
        super().__init__(cfg, src_dict, tgt_dict)
        self._warned_multiple = False
        self._report = None  # ExitLayerReport, made on first use with --print-exit-layers

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        pairs = self.datasets[split]
        src_sizes = _raw_sizes(pairs.src)
        # an empty line binarizes to </s> alone: kept (an empty target teaches </s> at position 1)
        empty_src = int((src_sizes <= 1).sum())
        empty_tgt = int((_raw_sizes(pairs.tgt) <= 1).sum()) if pairs.tgt is not None else 0
        if empty_src or empty_tgt:
            logger.warning(f"{split}: {empty_src} empty source and {empty_tgt} empty target lines (kept)")
        too_long = int((src_sizes > self.cfg.max_source_positions).sum())
        if too_long:
            action = "truncated to" if self.cfg.truncate_source else "will be skipped (or refused) as longer than"
            logger.warning(
                f"{split}: {too_long} of {len(pairs)} sources {action} "
                f"--max-source-positions {self.cfg.max_source_positions}"
            )

    def build_tokenizer(self, args):
        """fairseq's tokenizer (or none) behind a check that input text is valid UTF-8.

        fairseq-interactive builds it before reading stdin; stdin is switched to
        surrogateescape here so that a bad byte reaches the guard (replaced, counted,
        logged) instead of raising UnicodeDecodeError inside Python's reader."""
        stdin = sys.stdin
        if isinstance(stdin, io.TextIOWrapper) and stdin.errors == "strict":
            stdin.reconfigure(errors="surrogateescape")
        return Utf8Guard(super().build_tokenizer(args))

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        if self.cfg.eval_rouge:
            # the model in training must keep its fp32 weights: no --bf16-generation here
            self._eval_generator = self.build_generator([model], None, extra_gen_cls_kwargs={"bf16": False})
        return model

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if hasattr(criterion, "set_num_updates"):  # lplm: the glancing ratio anneals with the updates
            criterion.set_num_updates(update_num)
        return super().train_step(sample, model, self._autocast(criterion, model), optimizer, update_num, ignore_grad)

    def _autocast(self, criterion, model):
        """``criterion`` (which fairseq's train/valid steps call for the forward pass and the loss, and
        only for that), run under bf16 autocast with --autocast-bf16; the backward stays outside it."""
        if not self.cfg.autocast_bf16:
            return criterion
        device = next(model.parameters()).device.type

        def forward_in_bf16(*args, **kwargs):
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                return criterion(*args, **kwargs)

        return forward_in_bf16

    def valid_step(self, sample, model, criterion):
        loss, sample_size, logging_output = super().valid_step(sample, model, self._autocast(criterion, model))
        if self.cfg.eval_rouge:
            from .score import rouge  # here, so `python -m elmer_fairseq.score` finds it not yet imported

            hypos = self.inference_step(self._eval_generator, [model], sample)
            pad = self.tgt_dict.pad()
            hyps = [self._eval_text(h[0]["tokens"]) for h in hypos]
            refs = [self._eval_text(utils.strip_pad(t, pad)) for t in sample["target"]]
            logging_output["_rougeL_sum"] = rouge(hyps, refs)["ROUGE-L"] * len(hyps)
            logging_output["_rougeL_n"] = len(hyps)
        return loss, sample_size, logging_output

    def _eval_text(self, tokens):
        return self.tgt_dict.string(tokens.int().cpu(), self.cfg.eval_bleu_remove_bpe)

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        if self.cfg.eval_rouge:
            for key in ("_rougeL_sum", "_rougeL_n"):
                metrics.log_scalar_sum(key, sum(log.get(key, 0) for log in logging_outputs))
            metrics.log_derived(
                "rougeL", lambda meters: round(meters["_rougeL_sum"].sum / max(meters["_rougeL_n"].sum, 1), 2)
            )

    def get_batch_iterator(self, dataset, **kwargs):
        """Two fixes to fairseq 0.12's batching.

        1. It drops the last batch when it is not a multiple of
           --required-batch-size-multiple (fairseq issue 5036): fairseq-generate then
           skips up to 7 test sentences and training skips the same longest pairs
           every epoch. We batch with a multiple of 1 instead, and say so.
        2. It orders the examples with numpy_seed(seed + epoch) once, when the iterator
           is first built, and reuses that iterator in later epochs: a run resumed at
           epoch E > 1 would batch differently from the run it continues. We build it
           as at epoch 1; the checkpoint's iterator state then moves it to epoch E.
        """
        multiple = kwargs.get("required_batch_size_multiple", 1)
        if multiple > 1:
            if not self._warned_multiple:
                logger.warning(
                    f"--required-batch-size-multiple {multiple} ignored (using 1): fairseq would drop "
                    "the last batch of every split that is not a multiple of it"
                )
                self._warned_multiple = True
            kwargs["required_batch_size_multiple"] = 1
        reusable = (
            not kwargs.get("update_epoch_batch_itr", False)
            and not kwargs.get("disable_iterator_cache", False)
            and self.can_reuse_epoch_itr(dataset)
            and dataset not in self.dataset_to_epoch_iter
        )
        if reusable and kwargs.get("epoch", 1) > 1:
            kwargs["epoch"] = 1
        return super().get_batch_iterator(dataset, **kwargs)

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, **kwargs):
        """The one-pass generator from the task's generation options; ``extra_gen_cls_kwargs``
        overrides them by ``EarlyExitGenerator`` argument name (the Python API does)."""
        options = dict(
            exit_threshold=self.cfg.exit_threshold,
            collapse=self.cfg.collapse_repeats,
            compile=self.cfg.compile,
            length_rule=self.cfg.length_rule,
            eos_penalty=self.cfg.eos_penalty,
            no_repeat_neighbours=self.cfg.no_repeat_neighbours,
            length_quantile=self.cfg.length_quantile,
            blank_penalty=self.cfg.blank_penalty,
            bf16=self.cfg.bf16_generation,
        )
        extra = dict(extra_gen_cls_kwargs or {})
        # fairseq-generate always passes its LM-fusion arguments (None unless --lm-path)
        if extra.pop("lm_model", None) is not None:
            raise ValueError("--lm-path: the one-pass early-exit generator does not fuse a language model")
        extra.pop("lm_weight", None)
        options.update(extra)
        return EarlyExitGenerator(self.target_dictionary, **options)

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        hypos = super().inference_step(generator, models, sample, prefix_tokens, constraints)
        if self.cfg.print_exit_layers:
            self._exit_report.add(sample.get("id"), hypos, getattr(models[0], "num_exit_layers", None))
        return hypos

    @property
    def _exit_report(self):
        if self._report is None:
            self._report = ExitLayerReport()
            atexit.register(self._report.print_summary)
        return self._report
