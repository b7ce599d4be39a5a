#!/usr/bin/env python3
"""Subword segmentation for every recipe: train a sentencepiece model, encode or decode text files.

    python scripts/bpe.py train  --style sentencepiece --model PREFIX --vocab-size 4000 FILE...
    python scripts/bpe.py encode --style sentencepiece --model PREFIX.model IN:OUT [IN:OUT ...]
    python scripts/bpe.py encode --style gpt2 --encoder-json encoder.json --vocab-bpe vocab.bpe IN:OUT ...
    python scripts/bpe.py decode --style gpt2 --encoder-json encoder.json --vocab-bpe vocab.bpe IN:OUT ...

One process loads the model once and writes every IN:OUT pair, one line out for each line in
(blank lines stay blank: pre-training uses them as document ends). ``sentencepiece`` (BPE pieces,
sentencepiece's own specials kept out of the text, since fairseq's dictionary adds its own) is
encoded a file at a time in one batched call; ``gpt2`` is GPT-2's byte-level BPE as BART and
the released ELMER use, written as GPT-2 ids (binarize it with BART's dict.txt).
"""

import argparse


def sentencepiece_codec(args):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=args.model)

    def encode(lines):
        return [" ".join(pieces) for pieces in sp.encode(lines, out_type=str)]

    def decode(lines):
        return sp.decode([line.split() for line in lines])

    return encode, decode


def gpt2_codec(args):
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

    bpe = get_encoder(args.encoder_json, args.vocab_bpe)

    def encode(lines):
        return [" ".join(map(str, bpe.encode(line.strip()))) for line in lines]

    def decode(lines):
        return [bpe.decode([int(t) for t in line.split() if t.isdigit()]).strip() for line in lines]

    return encode, decode


def train_sentencepiece(args):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=",".join(args.inputs), model_prefix=args.model, vocab_size=args.vocab_size, model_type="bpe",
        character_coverage=1.0, bos_id=-1, eos_id=-1, unk_id=0, minloglevel=2,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    train = sub.add_parser("train", help="train a BPE sentencepiece model (writes PREFIX.model, PREFIX.vocab)")
    train.add_argument("--style", choices=["sentencepiece"], default="sentencepiece",
                       help="GPT-2's BPE is not trained here: it comes with BART's encoder.json and vocab.bpe")
    train.add_argument("--model", required=True, help="output prefix")
    train.add_argument("--vocab-size", type=int, default=4000)
    train.add_argument("inputs", nargs="+")
    for cmd in ("encode", "decode"):
        p = sub.add_parser(cmd, help=f"{cmd} text files, IN:OUT pairs")
        p.add_argument("--style", choices=["sentencepiece", "gpt2"], required=True)
        p.add_argument("--model", help="sentencepiece: the .model file")
        p.add_argument("--encoder-json", help="gpt2: encoder.json")
        p.add_argument("--vocab-bpe", help="gpt2: vocab.bpe")
        p.add_argument("pairs", nargs="+", metavar="IN:OUT")
    args = parser.parse_args(argv)
    if args.cmd == "train":
        train_sentencepiece(args)
        return
    if args.style == "sentencepiece" and not args.model:
        parser.error("--style sentencepiece needs --model (a .model file)")
    if args.style == "gpt2" and not (args.encoder_json and args.vocab_bpe):
        parser.error("--style gpt2 needs --encoder-json and --vocab-bpe")
    pairs = []
    for pair in args.pairs:
        src, sep, dst = pair.rpartition(":")
        if not sep or not src or not dst:
            parser.error(f"expected IN:OUT, got {pair!r}")
        pairs.append((src, dst))
    encode, decode = (sentencepiece_codec if args.style == "sentencepiece" else gpt2_codec)(args)
    codec = encode if args.cmd == "encode" else decode
    for src, dst in pairs:
        try:
            with open(src, encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f]
        except OSError as e:
            parser.exit(1, f"bpe.py: error: {e}\n")
        with open(dst, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in codec(lines))


if __name__ == "__main__":
    main()
