#!/usr/bin/env python3
"""Figure-2-style plot: the fraction of tokens exiting at each decoder layer, one series per δ.

Reads fairseq-generate logs made with ``--print-exit-layers`` (their ``E-`` lines) and scores
each log's hypotheses (ROUGE-L, from its ``D-``/``H-`` and ``T-`` lines) for the legend::

    python scripts/plot_exit_layers.py --log 0.25=gen.d025.txt --log 0.5=gen.d05.txt --out exits.png
"""

import argparse


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log", action="append", required=True, metavar="DELTA=PATH",
                        help="a generate log and the threshold δ it was made with; repeat per δ")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--title", default="Exit layers of generated tokens")
    args = parser.parse_args()

    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's import sets DEBUG
    import matplotlib.pyplot as plt

    from elmer_fairseq.generation_io import read_exit_layers
    from elmer_fairseq.score import parse_generate_log, score

    series = []
    for item in args.log:
        if "=" not in item:
            parser.error(f"--log takes DELTA=PATH, got {item!r}")
        delta, path = item.split("=", 1)
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
        try:
            hist = read_exit_layers(lines)
        except ValueError as e:
            parser.error(f"--log {path}: {e}")
        rouge_l = score(*parse_generate_log(lines))["ROUGE-L"]
        series.append((delta, hist, rouge_l))
        print(f"δ={delta}: ROUGE-L {rouge_l:.2f}, {hist.summary()}")

    # every layer 1..L, also those no token exited at (as in the paper's Figure 2)
    layers = list(range(1, max(len(hist.layers()) for _, hist, _ in series) + 1))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (delta, hist, rouge_l) in enumerate(series):
        fractions = hist.fractions()
        xs = [layer + (i - (len(series) - 1) / 2) * width for layer in layers]
        ax.bar(xs, [fractions.get(layer, 0.0) for layer in layers], width,
               label=f"δ={delta} (ROUGE-L {rouge_l:.1f})")
    ax.set_xticks(layers)
    ax.set_xlabel("exit layer")
    ax.set_ylabel("fraction of tokens")
    ax.set_title(args.title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
