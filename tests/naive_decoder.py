"""Naive per-token references for the vectorised decoder: plain Python loops over layers, sentences
and positions, written from the paper's definitions (a token that exits at layer e keeps h^e above e,
§4.1; hard exit at the first layer whose off-ramp entropy is below δ, Eq. 10)."""

import torch.nn.functional as F


def decoder_layer(dec, enc, idx, x, pad):
    """One decoder layer over the whole canvas, (T, B, C) in and out."""
    y, _, _ = dec.layers[idx](x, enc["encoder_out"][0], enc["encoder_padding_mask"][0], self_attn_padding_mask=pad)
    return y


def naive_decode(model, src, src_len, canvas, exit_layers):
    """Per-layer, per-token loop: a token exiting at e keeps h^e above e."""
    dec = model.decoder
    enc = model.encoder(src, src_lengths=src_len)
    x = dec.embed(canvas)
    pad = canvas.eq(dec.padding_idx)
    saved = {}
    states = [x.clone()]
    for idx in range(len(dec.layers)):
        level = idx + 1
        y = decoder_layer(dec, enc, idx, x, pad).clone()
        for b in range(canvas.size(0)):
            for t in range(canvas.size(1)):
                if pad[b, t]:
                    continue
                e = int(exit_layers[b, t])
                if e < level:
                    y[t, b] = saved[b, t]
                elif e == level:
                    saved[b, t] = y[t, b].clone()
        x = y
        states.append(x.clone())
    return saved, states


def naive_entropy_exit_layers(model, src, src_len, canvas, threshold):
    """Per-token loop: exit at the first layer whose off-ramp entropy < threshold; copy above."""
    dec = model.decoder
    enc = model.encoder(src, src_lengths=src_len)
    x = dec.embed(canvas)
    pad = canvas.eq(dec.padding_idx)
    L = len(dec.layers)
    exit_layer = {}
    saved = {}
    for idx in range(L):
        y = decoder_layer(dec, enc, idx, x, pad).clone()
        for b in range(canvas.size(0)):
            for t in range(canvas.size(1)):
                if pad[b, t]:
                    continue
                if (b, t) in exit_layer:
                    y[t, b] = saved[b, t]
                    continue
                p = F.softmax(dec.off_ramp(y[t, b], idx + 1).double(), -1)
                entropy = -(p * p.log()).sum()
                if entropy < threshold or idx == L - 1:
                    exit_layer[b, t] = idx + 1
                    saved[b, t] = y[t, b].clone()
        x = y
    return exit_layer
