#!/usr/bin/env python3
"""GPT-2 byte-level BPE, as BART and ELMER use: text lines -> lines of GPT-2 ids (fairseq's format).

    python scripts/gpt2_bpe.py --encoder-json encoder.json --vocab-bpe vocab.bpe IN OUT
    python scripts/gpt2_bpe.py --encoder-json encoder.json --vocab-bpe vocab.bpe --decode IN OUT

Binarize the output with BART's dict.txt (fairseq-preprocess --srcdict dict.txt), and give
fairseq-generate ``--bpe gpt2 --gpt2-encoder-json ... --gpt2-vocab-bpe ...`` (or decode with
--decode). Blank lines stay blank (they separate documents). One line in, one line out.
"""

import argparse

from fairseq.data.encoders.gpt2_bpe_utils import get_encoder


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder-json", required=True)
    parser.add_argument("--vocab-bpe", required=True)
    parser.add_argument("--decode", action="store_true", help="ids -> text instead")
    parser.add_argument("input")
    parser.add_argument("output")
    args = parser.parse_args()
    bpe = get_encoder(args.encoder_json, args.vocab_bpe)
    with open(args.input, encoding="utf-8") as fin, open(args.output, "w", encoding="utf-8") as fout:
        for line in fin:
            line = line.rstrip("\n")
            if args.decode:
                ids = [int(t) for t in line.split() if t.isdigit()]
                fout.write(bpe.decode(ids).strip() + "\n")
            else:
                fout.write(" ".join(map(str, bpe.encode(line.strip()))) + "\n")


if __name__ == "__main__":
    main()
