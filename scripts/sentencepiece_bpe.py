#!/usr/bin/env python3
"""Train a sentencepiece model and encode text files with it (one line in, one line out).

    python scripts/sentencepiece_bpe.py train --model OUT_PREFIX --vocab-size 4000 FILE...
    python scripts/sentencepiece_bpe.py encode --model OUT_PREFIX.model IN OUT
"""

import argparse

import sentencepiece as spm


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    train = sub.add_parser("train", help="train a BPE sentencepiece model")
    train.add_argument("--model", required=True, help="output prefix (writes PREFIX.model, PREFIX.vocab)")
    train.add_argument("--vocab-size", type=int, default=4000)
    train.add_argument("inputs", nargs="+")
    enc = sub.add_parser("encode", help="encode a text file into pieces")
    enc.add_argument("--model", required=True, help="a .model file")
    enc.add_argument("input")
    enc.add_argument("output")
    args = parser.parse_args()

    if args.cmd == "train":
        spm.SentencePieceTrainer.train(
            input=",".join(args.inputs),
            model_prefix=args.model,
            vocab_size=args.vocab_size,
            model_type="bpe",
            character_coverage=1.0,
            # fairseq's dictionary adds its own specials; keep sentencepiece's out of the text
            bos_id=-1,
            eos_id=-1,
            unk_id=0,
            minloglevel=2,
        )
    else:
        sp = spm.SentencePieceProcessor(model_file=args.model)
        with open(args.input, encoding="utf-8") as fin:
            lines = [line.rstrip("\n") for line in fin]
        with open(args.output, "w", encoding="utf-8") as fout:  # one batched call: C++ does the loop
            fout.writelines(" ".join(pieces) + "\n" for pieces in sp.encode(lines, out_type=str))


if __name__ == "__main__":
    main()
