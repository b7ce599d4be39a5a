"""Token-level exit in the decoder: copy semantics against a naive per-token oracle."""

import torch

from helpers import encode, make_model
from naive_decoder import naive_decode
from elmer_fairseq.exit_policies import AssignedExit, EntropyExit

SOURCES = ["the cat sat on the mat", "a dog ran"]


def setup(task, **kw):
    model = make_model(task, **kw)
    src, src_len = encode(task, SOURCES)
    canvas = model.initialize_canvas(src_len)
    gen = torch.Generator().manual_seed(3)
    exit_layers = torch.randint(1, model.num_exit_layers + 1, canvas.shape, generator=gen)
    return model, src, src_len, canvas, exit_layers


def test_exited_state_is_bit_identical_in_upper_layers(task):
    model, src, src_len, canvas, exit_layers = setup(task)
    states, extra = model(src, src_len, canvas, exit_layers=exit_layers, return_all_hiddens=True)
    inner = extra["inner_states"]
    nonpad = canvas.ne(task.target_dictionary.pad())
    assert torch.equal(extra["exit_layers"][nonpad], exit_layers[nonpad])
    L = model.num_exit_layers
    checked = 0
    for b in range(canvas.size(0)):
        for t in range(canvas.size(1)):
            if not nonpad[b, t]:
                continue
            e = int(exit_layers[b, t])
            assert torch.equal(states[b, t], inner[e][t, b])
            for level in range(e, len(inner)):
                assert torch.equal(inner[level][t, b], inner[e][t, b])
            if e < L and len(inner) > e + 1:
                checked += 1
    assert checked > 0


def test_vectorised_decoder_matches_naive_oracle(task):
    model, src, src_len, canvas, exit_layers = setup(task)
    states, extra = model(src, src_len, canvas, exit_layers=exit_layers, return_all_hiddens=True)
    saved, naive_states = naive_decode(model, src, src_len, canvas, exit_layers)
    for (b, t), h in saved.items():
        torch.testing.assert_close(states[b, t], h, rtol=0, atol=1e-6)


def test_running_tokens_attend_to_exited_tokens(task):
    """Changing only where token 0 exits changes the upper states of the other tokens."""
    model, src, src_len, canvas, _ = setup(task)
    L = model.num_exit_layers
    late = torch.full_like(canvas, L)
    early = late.clone()
    early[:, 0] = 1
    _, extra_late = model(src, src_len, canvas, exit_layers=late, return_all_hiddens=True)
    _, extra_early = model(src, src_len, canvas, exit_layers=early, return_all_hiddens=True)
    # layer 1 identical; above it token 1 (still running) sees a different key/value at token 0
    assert torch.equal(extra_late["inner_states"][1], extra_early["inner_states"][1])
    assert not torch.allclose(extra_late["inner_states"][L][1, 0], extra_early["inner_states"][L][1, 0])


def test_assigned_exit_stops_at_highest_exit_layer(task):
    model, src, src_len, canvas, _ = setup(task)
    ones = torch.ones_like(canvas)
    _, extra = model(src, src_len, canvas, exit_layers=ones, return_all_hiddens=True)
    assert len(extra["inner_states"]) == 2  # embedding + layer 1 only


def test_exit_copy_grad_flag(task):
    """Detached by default (as the released code): a loss on a running token at the top sends exactly
    zero gradient into the state h^1 of a token that exited at layer 1, since its only path there is
    the copy in layers 2..L; with --exit-copy-grad the copy carries gradient."""
    for copy_grad in (False, True):
        model, src, src_len, canvas, _ = setup(task, exit_copy_grad=copy_grad)
        model.train()
        layers = torch.full_like(canvas, model.num_exit_layers)
        layers[:, 0] = 1  # token 0 of every sentence exits at layer 1
        seen = []

        def keep_output(module, inputs, output):
            output[0].retain_grad()
            seen.append(output[0])

        handle = model.decoder.layers[0].register_forward_hook(keep_output)
        states, _ = model(src, src_len, canvas, exit_layers=layers)
        handle.remove()
        weights = torch.randn(states.size(-1), generator=torch.Generator().manual_seed(0))
        (states[0, 1] * weights).sum().backward()  # sentence 0, token 1: runs to the last layer
        h1 = seen[0]  # layer 1's output, (T, B, C)
        to_exited = h1.grad[0, 0]  # token 0 of sentence 0
        assert h1.grad[1, 0].abs().sum() > 0  # the running token's own h^1 gets gradient either way
        if copy_grad:
            assert to_exited.abs().sum() > 0
        else:
            assert torch.count_nonzero(to_exited) == 0


def test_entropy_exit_extremes(task):
    model, src, src_len, canvas, _ = setup(task)
    nonpad = canvas.ne(task.target_dictionary.pad())
    _, extra = model(src, src_len, canvas, policy=EntropyExit(0.0))
    assert (extra["exit_layers"][nonpad] == model.num_exit_layers).all()
    _, extra = model(src, src_len, canvas, policy=EntropyExit(1e9), return_all_hiddens=True)
    assert (extra["exit_layers"][nonpad] == 1).all()
    assert len(extra["inner_states"]) == 2  # stopped after layer 1: everything had exited


def test_assigned_exit_rejects_layers_out_of_range(task):
    model, src, src_len, canvas, _ = setup(task)
    bad = torch.full_like(canvas, model.num_exit_layers + 1)
    try:
        model(src, src_len, canvas, policy=AssignedExit(bad))
    except ValueError as e:
        assert "exit layers must lie in 1.." in str(e)
    else:
        raise AssertionError("out-of-range exit layers were accepted")


def test_last_layer_fast_path_equals_general_loop(task):
    """A plain last-layer pass skips the exit bookkeeping; it must give the general loop's
    states bit for bit (padding zeroed in both) and the same exit layers."""
    model = make_model(task)
    src, src_len = encode(task, SOURCES)
    canvas = model.initialize_canvas(src_len)
    with torch.no_grad():
        fast, fast_extra = model(src, src_len, canvas)
        general, general_extra = model(src, src_len, canvas, return_all_hiddens=True)
        _, naive_states = naive_decode(model, src, src_len, canvas, torch.full_like(canvas, model.num_exit_layers))
    naive = naive_states[-1].transpose(0, 1)
    pad = canvas.eq(task.target_dictionary.pad())
    assert pad.any()  # the batch has padding, so zeroing is exercised
    assert torch.equal(fast, general)
    assert torch.equal(fast_extra["exit_layers"], general_extra["exit_layers"])
    assert torch.allclose(fast[~pad], naive[~pad], atol=1e-6)
