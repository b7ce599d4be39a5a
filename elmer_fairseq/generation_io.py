"""What generation writes and the tools read back: fairseq-generate's text lines (``read_generate_log``,
for scoring and distillation), the exit layers of generated tokens
(``--print-exit-layers``: one ``E-<id>`` line per hypothesis and a closing histogram line) and the
UTF-8 guard on interactive input. The task writes these lines; ``scripts/plot_exit_layers.py`` and
``scripts/sweep_threshold.sh`` read them back through ``read_exit_layers``, so the format lives here
only::

    E-7\t1 1 3 2            the exit layer of each token of hypothesis 7, </s> included
    Exit layers: L1=0.500 L2=0.250 L3=0.250 | mean 1.750 | tokens 4

    elmer-exit-layers generate.log     # the histogram line of a log's E- lines
"""

import argparse
import collections
import logging
import re
import sys

logger = logging.getLogger(__name__)

EXIT_LINE = re.compile(r"^E-(\d+)\t(.*)$")
TEXT_LINE = re.compile(r"^([STHD])-(\d+)\t(.*)$")
SUMMARY_LAYER = re.compile(r"\bL(\d+)=")


def read_generate_log(lines, nbest=False):
    """``{kind: {sentence id: text}}`` from fairseq-generate's S- (source), T- (reference), H- (hypothesis)
    and D- (detokenized hypothesis) lines. H-/D- lines are ``score<TAB>text``: the text is kept, and of
    an id's n-best only the first line (the best); with ``nbest`` an H-/D- entry is the list of all of
    them, in the log's order (fairseq's: best first)."""
    found = {kind: {} for kind in "STHD"}
    for line in lines:
        m = TEXT_LINE.match(line.rstrip("\n"))
        if not m:
            continue
        kind, idx, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind in "HD":
            rest = rest.split("\t", 1)[1] if "\t" in rest else ""
            if nbest:
                found[kind].setdefault(idx, []).append(rest)
                continue
            if idx in found[kind]:
                continue
        found[kind][idx] = rest
    return found


def exit_line(sample_id, layers) -> str:
    return f"E-{sample_id}\t" + " ".join(map(str, layers))


class ExitHistogram:
    """Counts of tokens per exit layer. ``num_layers`` (the decoder's L) makes every layer 1..L show,
    those no token exited at included (the paper's Figure 2 shows them all)."""

    def __init__(self, num_layers=None):
        self.counts = collections.Counter()
        self.num_layers = num_layers

    def update(self, layers):
        self.counts.update(layers)

    @property
    def total(self):
        return sum(self.counts.values())

    def layers(self):
        top = max([self.num_layers or 0, *self.counts])
        return list(range(1, top + 1))

    def fractions(self):
        total = self.total
        return {layer: self.counts.get(layer, 0) / total for layer in self.layers()} if total else {}

    def mean(self):
        return sum(k * v for k, v in self.counts.items()) / self.total

    def summary(self):
        if not self.total:
            return "Exit layers: no tokens"
        fractions = " ".join(f"L{k}={v:.3f}" for k, v in self.fractions().items())
        return f"Exit layers: {fractions} | mean {self.mean():.3f} | tokens {self.total}"


def read_exit_layers(lines) -> ExitHistogram:
    """The histogram of a generate log's ``E-`` lines; L is taken from its summary line when present
    (else the highest layer seen)."""
    hist = ExitHistogram()
    for line in lines:
        line = line.rstrip("\n")
        m = EXIT_LINE.match(line)
        if m:
            hist.update(int(x) for x in m.group(2).split())
        elif line.startswith("Exit layers: "):
            hist.num_layers = max([int(k) for k in SUMMARY_LAYER.findall(line)], default=None)
    if not hist.total:
        raise ValueError("no E- lines: generate with --print-exit-layers")
    return hist


class ExitLayerReport:
    """E- lines per hypothesis and a closing histogram of exit layers (to stdout)."""

    def __init__(self, stream=None, num_layers=None):
        self.stream = stream
        self.histogram = ExitHistogram(num_layers)
        self.next_id = 0
        self.warned = False

    def add(self, ids, hypos, num_layers=None):
        """``ids``: the batch's sentence ids. fairseq-interactive passes none: its one-sentence
        batches (the default) are numbered in order; larger ones only feed the summary."""
        if num_layers:
            self.histogram.num_layers = num_layers
        if ids is None and len(hypos) == 1:
            ids = [self.next_id]
        elif ids is None:
            if not self.warned:
                logger.warning("--print-exit-layers: these batches carry no sentence ids; E- lines need "
                               "fairseq-generate or --batch-size 1, the summary counts every token")
                self.warned = True
        else:
            ids = ids.tolist()
        self.next_id += len(hypos)
        for i, nbest in enumerate(hypos):
            layers = nbest[0]["exit_layers"].tolist()
            self.histogram.update(layers)
            if ids is not None:
                print(exit_line(ids[i], layers), file=self.stream or sys.stdout)

    def summary(self):
        return self.histogram.summary()

    def print_summary(self):
        print(self.summary(), file=self.stream or sys.stdout, flush=True)


class Utf8Guard:
    """Input lines that were not valid UTF-8 reach fairseq-interactive as strings with lone
    surrogates (Python's surrogateescape), which sentencepiece and the BPEs cannot take. Each
    such line has its undecodable bytes replaced by U+FFFD, and is counted and logged."""

    _SURROGATE = re.compile("[\ud800-\udfff]")

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.lines_seen = 0
        self.lines_replaced = 0

    def encode(self, text):
        self.lines_seen += 1
        bad = len(self._SURROGATE.findall(text))
        if bad:
            self.lines_replaced += 1
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            logger.warning(
                f"input line {self.lines_seen} is not valid UTF-8: {bad} undecodable byte(s) replaced by "
                f"U+FFFD ({self.lines_replaced} line(s) so far); convert the input to UTF-8 (e.g. iconv)"
            )
        return self.tokenizer.encode(text) if self.tokenizer is not None else text

    def decode(self, text):
        return self.tokenizer.decode(text) if self.tokenizer is not None else text


def main(argv=None):
    parser = argparse.ArgumentParser(description="the exit-layer histogram of a fairseq-generate log's E- lines")
    parser.add_argument("log", help="fairseq-generate output made with --print-exit-layers")
    args = parser.parse_args(argv)
    try:
        with open(args.log, encoding="utf-8") as f:
            print(read_exit_layers(f).summary())
    except (OSError, ValueError) as e:
        parser.exit(1, f"{parser.prog}: error: {args.log}: {e}\n")
