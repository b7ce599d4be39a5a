"""Model sizes as fairseq-train flags, read alike by ``elmer_nat`` and fairseq's ``transformer`` and
NAT models, so the benchmark (``scripts/benchmark.py``) and the quality harness
(``scripts/compare.py``) train every system at the same size."""


def size_flags(layers: int, dim: int, ffn: int, heads: int):
    """Encoder and decoder of ``layers`` layers each, width ``dim``, FFN ``ffn``, ``heads`` heads."""
    flags = []
    for side in ("encoder", "decoder"):
        flags += [f"--{side}-layers", str(layers), f"--{side}-embed-dim", str(dim),
                  f"--{side}-ffn-embed-dim", str(ffn), f"--{side}-attention-heads", str(heads)]
    return flags
