"""``elmer_denoising``: ELMER's pre-training data (paper §4.2).

Monolingual text binarized by ``fairseq-preprocess --only-source`` is cut
into blocks and corrupted on the fly by fairseq's ``DenoisingDataset``, with
the paper's settings as defaults: sentence shuffling, then text infilling
(15% of the tokens in spans of Poisson(λ = 3) length, each span replaced by a
single ``<mask>``). The decoder target is the original block; the criterion
``lplm`` then gives every target token a random exit layer (Eq. 9).

Three things differ from fairseq's ``denoising`` task, each for ELMER:

* sentence boundaries come from the dictionary: pieces that end a sentence
  (``.``, ``!``, ``?``) for sentencepiece and GPT-2 BPE alike (fairseq's
  dataset knows GPT-2's "." only, and otherwise expects ``</s>`` between
  sentences, which ``StripTokenDataset`` has removed);
* source and target lose their leading ``<s>``, so pre-training pairs look
  like ``nat_early_exit`` pairs (``x </s>`` -> ``y </s>``): the canvas is
  trained to write ``y`` then ``</s>``, exactly what fine-tuning asks;
* the noise of item i at epoch e is a function of (seed, e, i) for torch's
  random draws too (fairseq seeds numpy only), so a resumed run and a
  fresh one see the same corruption.
"""

import json
import math
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq import utils
from fairseq.data import DenoisingDataset
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.denoising import DenoisingConfig, DenoisingTask

from .canvas import MASK_SYMBOL

logger = logging.getLogger(__name__)

SENTENCE_END_CHARS = ".!?"
BPE_CHOICES = ChoiceEnum(["sentencepiece", "gpt2", "none"])


@dataclass
class ElmerDenoisingConfig(DenoisingConfig):
    # the paper's values (§4.2) as defaults
    mask: float = field(default=0.15, metadata={"help": "fraction of tokens masked by text infilling"})
    mask_length: ChoiceEnum(["subword", "word", "span-poisson"]) = field(
        default="span-poisson", metadata={"help": "span lengths: one (sub)word, or Poisson(--poisson-lambda)"}
    )
    poisson_lambda: float = field(default=3.0, metadata={"help": "mean span length of text infilling"})
    replace_length: int = field(
        default=1, metadata={"help": "a masked span becomes 0, 1, or (-1) as many <mask> tokens as it had"}
    )
    permute_sentences: float = field(
        default=1.0, metadata={"help": "fraction of each block's sentences shuffled (sentence shuffling)"}
    )
    rotate: float = field(default=0.0, metadata={"help": "fraction of blocks rotated (not in ELMER)"})
    bpe_style: BPE_CHOICES = field(
        default="sentencepiece",
        metadata={
            "help": "how the dictionary's symbols spell words, for whole-word spans and sentence ends: "
            "sentencepiece (word starts with U+2581), gpt2 (symbols are GPT-2 ids; whole words need "
            "--gpt2-encoder-json), none (subword spans; sentence ends = symbols ending in .!?). "
            "(fairseq's --bpe is the global tokenizer option, not this)"
        },
    )
    gpt2_encoder_json: Optional[str] = field(
        default=None, metadata={"help": "GPT-2 encoder.json, to read word starts and sentence ends from GPT-2 ids"}
    )


def _symbol_texts(dictionary, bpe: str, encoder_json: Optional[str]):
    """The surface text of each dictionary symbol ('▁'/'Ġ' kept as a leading space), or None if unknown."""
    symbols = list(dictionary.symbols)
    if bpe != "gpt2":
        return [s.replace("\u2581", " ") for s in symbols]
    if encoder_json is None:
        return None
    with open(encoder_json, encoding="utf-8") as f:
        id_to_token = {str(v): k for k, v in json.load(f).items()}
    return [id_to_token.get(s, s).replace("\u0120", " ") for s in symbols]


def word_and_sentence_tables(dictionary, bpe: str, encoder_json: Optional[str] = None):
    """Two boolean tables over the dictionary: ``word_start[i]`` (None: subword masking)
    and ``sentence_end[i]``. Special symbols start words and never end sentences."""
    texts = _symbol_texts(dictionary, bpe, encoder_json)
    n = len(dictionary)
    special = torch.zeros(n, dtype=torch.bool)
    special[: dictionary.nspecial] = True
    special[dictionary.index(MASK_SYMBOL)] = True
    if texts is None:  # GPT-2 ids without encoder.json: ".", "!", "?" are ids 13, 0, 30
        sentence_end = torch.zeros(n, dtype=torch.bool)
        for gpt2_id in ("13", "0", "30"):
            if gpt2_id in dictionary:
                sentence_end[dictionary.index(gpt2_id)] = True
        return None, sentence_end
    sentence_end = torch.tensor([t.strip().endswith(tuple(SENTENCE_END_CHARS)) for t in texts]) & ~special
    word_start = None
    if bpe != "none":
        word_start = torch.tensor([t.startswith(" ") for t in texts]) | special
    return word_start, sentence_end


class ElmerDenoisingDataset(DenoisingDataset):
    """fairseq's DenoisingDataset with dictionary-driven sentence ends, seeded torch noise
    and pairs without the leading ``<s>`` (see the module docstring)."""

    def __init__(self, *args, sentence_end: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        self.sentence_end = sentence_end

    def __getitem__(self, index):
        seed = int(((self.seed * 1_000_003 + int(self.epoch)) * 1_000_003 + int(index)) % (2**31))
        with utils.set_torch_seed(seed):
            item = super().__getitem__(index)
        item["source"] = item["source"][1:]  # drop <s>
        item["target"] = item["target"][1:]
        return item

    def permute_sentences(self, source, p=1.0):
        """Shuffle a fraction p of the sentences of ``<s> ... </s>``; a sentence ends at a
        run of sentence-end symbols (the last one ends at ``</s>``)."""
        full_stops = self.sentence_end[source]
        full_stops[-2] = True
        ends = (full_stops[1:-1] & ~full_stops[2:]).nonzero(as_tuple=False).squeeze(1) + 2
        starts = torch.cat([ends.new_ones(1), ends[:-1]])
        n = ends.numel()
        if n < 2:
            return source
        num_to_permute = math.ceil(n * p)
        chosen = torch.randperm(n)[:num_to_permute]
        order = torch.arange(n)
        order[chosen] = chosen[torch.randperm(num_to_permute)]
        pieces = [source[starts[i] : ends[i]] for i in order.tolist()]
        return torch.cat([source[:1], *pieces, source[ends[-1] :]])

    def collater(self, samples, pad_to_length=None):
        batch = super().collater(samples, pad_to_length)
        if batch:
            batch["nsentences"] = len(samples)  # fairseq's collate counts the first source's tokens
            batch["net_input"].pop("prev_output_tokens", None)
        return batch

    def size(self, index):
        return max(self.sizes[index] - 1, 1)

    def num_tokens(self, index):
        return self.size(index)


@register_task("elmer_denoising", dataclass=ElmerDenoisingConfig)
class ElmerDenoisingTask(DenoisingTask):
    """Denoising pre-training data for ``--arch elmer_nat --criterion lplm``."""

    cfg: ElmerDenoisingConfig

    def __init__(self, cfg, dictionary):
        super().__init__(cfg, dictionary)  # adds <mask>
        for name, value, ok in (
            ("--mask", cfg.mask, 0.0 <= cfg.mask < 1.0),
            ("--permute-sentences", cfg.permute_sentences, 0.0 <= cfg.permute_sentences <= 1.0),
            ("--poisson-lambda", cfg.poisson_lambda, cfg.poisson_lambda > 0),
            ("--replace-length", cfg.replace_length, cfg.replace_length in (-1, 0, 1)),
            ("--tokens-per-sample", cfg.tokens_per_sample, cfg.tokens_per_sample > 2),
        ):
            if not ok:
                raise ValueError(f"{name}: invalid value {value}")
        if cfg.bpe_style == "gpt2" and cfg.gpt2_encoder_json and not os.path.isfile(cfg.gpt2_encoder_json):
            raise FileNotFoundError(f"--gpt2-encoder-json: no file {cfg.gpt2_encoder_json}")
        self.word_start, self.sentence_end = word_and_sentence_tables(
            dictionary, cfg.bpe_style, cfg.gpt2_encoder_json
        )
        if self.word_start is None and cfg.mask_length != "subword":
            logger.warning(
                f"--bpe-style {cfg.bpe_style} without word boundaries (GPT-2 needs --gpt2-encoder-json): "
                "spans are counted in subwords"
            )
        logger.info(
            f"{int(self.sentence_end.sum())} sentence-end symbols, "
            f"{'whole-word' if self.word_start is not None else 'subword'} spans"
        )

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        paths = utils.split_paths(self.cfg.data)
        split_path = os.path.join(paths[(epoch - 1) % len(paths)], split)
        if not os.path.exists(split_path + ".idx"):
            raise FileNotFoundError(
                f"{split}: no {split_path}.bin/.idx; binarize it with fairseq-preprocess --only-source "
                f"--{split}pref ... (or pass another --valid-subset)"
            )
        blocks = self._load_dataset_split(split, epoch, combine)
        self.datasets[split] = ElmerDenoisingDataset(
            blocks,
            blocks.sizes,
            self.dictionary,
            self.mask_idx,
            self.word_start.byte() if self.word_start is not None and self.cfg.mask_length != "subword" else None,
            shuffle=self.cfg.shuffle_instance,
            seed=self.cfg.seed,
            mask=self.cfg.mask,
            mask_random=self.cfg.mask_random,
            insert=self.cfg.insert,
            rotate=self.cfg.rotate,
            permute_sentences=self.cfg.permute_sentences,
            bpe=self.cfg.bpe_style,
            replace_length=self.cfg.replace_length,
            mask_length=self.cfg.mask_length,
            poisson_lambda=self.cfg.poisson_lambda,
            sentence_end=self.sentence_end,
        )
        logger.info(f"{split}: {len(blocks)} blocks of at most {self.cfg.tokens_per_sample} tokens")
