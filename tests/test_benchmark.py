"""scripts/benchmark.py's timing protocol (the timed numbers themselves belong to benchmarks, not tests)."""

import argparse
import os
import sys

import torch

from helpers import REPO


def test_large_batch_throughput_is_timed_after_every_batch_ran_once(monkeypatch):
    """sent/s at --large-batch: every large batch runs once untimed before the timed pass (on CUDA the first
    call of each batch shape loads and selects kernels), and the timed pass counts each sentence once."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import benchmark

    small = [{"id": f"s{i}", "nsentences": 1} for i in range(3)]
    large = [{"id": f"L{i}", "nsentences": n} for i, n in enumerate((4, 4, 2))]
    monkeypatch.setattr(benchmark, "timing_ids", lambda models_tasks, split, limit: list(range(10)))
    monkeypatch.setattr(benchmark, "batches", lambda task, split, ids, bs, device: small if bs == 1 else large)
    calls, clock = [], [0.0]

    def run_one(model, task, gen, sample, floor):
        calls.append(sample["id"])
        return [[{"tokens": torch.tensor([4, 5, 2])}] for _ in range(sample["nsentences"])]

    def perf_counter():  # one time unit per call of the fake clock; the warm-up must happen before t0
        clock[0] += 1.0
        calls.append("clock")
        return clock[0]

    monkeypatch.setattr(benchmark, "run_one", run_one)
    monkeypatch.setattr(benchmark.time, "perf_counter", perf_counter)
    task = argparse.Namespace(target_dictionary=argparse.Namespace(bos=lambda: 0, eos=lambda: 2, pad=lambda: 1))
    model = argparse.Namespace()
    args = argparse.Namespace(split="valid", max_sentences=10, warmup=1, large_batch=4, memory_batches=[])
    (res,) = benchmark.measure_all([("sys", model, task, None, False)], args, torch.device("cpu"))
    large_calls = [c for c in calls if c.startswith("L") or c == "clock"]
    # warm-up: L0 L1 L2 untimed; then t0, the timed pass, and the end of the clock
    assert large_calls[-8:] == ["L0", "L1", "L2", "clock", "L0", "L1", "L2", "clock"]
    assert res["sent_per_s_bs4"] == 10 / 1.0  # 10 sentences over one tick of the fake clock


def test_timing_ids_spread_over_source_lengths_and_fit_every_model():
    """The timed sentences: those every model takes whole, sorted by the first task's source lengths, then
    every (n / limit)-th from the shortest to the longest (by hand for 10 sentences, limit 4)."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import benchmark

    def system(src_sizes, max_source):
        dataset = argparse.Namespace(src_sizes=src_sizes)
        task = argparse.Namespace(datasets={"valid": dataset}, dataset=lambda split: dataset)
        return argparse.Namespace(max_positions=lambda: (max_source, 1024)), task

    sizes = [50, 10, 90, 30, 70, 20, 600, 40, 80, 60]  # id 6 is longer than the second model takes
    elmer = system(sizes, 1024)
    nat = system(sizes, 512)
    # the nine that fit, by length: ids 1 5 3 7 0 9 4 8 2; positions 0, 3 (2.67), 5 (5.33), 8
    assert benchmark.timing_ids([elmer, nat], "valid", 4) == [1, 7, 9, 2]
    assert benchmark.timing_ids([elmer], "valid", 100) == [1, 5, 3, 7, 0, 9, 4, 8, 2, 6]


def test_each_batch_one_call_is_timed_right_after_an_untimed_call_of_the_same_system(monkeypatch):
    """Round-robin at batch 1: for every sentence and system, one untimed call, then the clock, the timed
    call of the same system on the same sentence, the clock; the systems take turns sentence by sentence."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import benchmark

    small = [{"id": f"s{i}", "nsentences": 1} for i in range(2)]
    monkeypatch.setattr(benchmark, "timing_ids", lambda models_tasks, split, limit: [0, 1])
    monkeypatch.setattr(benchmark, "batches", lambda task, split, ids, bs, device: small if bs == 1 else [])
    calls = []

    def run_one(model, task, gen, sample, floor):
        calls.append((model.name, sample["id"]))
        return [[{"tokens": torch.tensor([4, 2])}]]

    monkeypatch.setattr(benchmark, "run_one", run_one)
    ticks = iter(range(1000))
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: calls.append("clock") or float(next(ticks)))
    task = argparse.Namespace(target_dictionary=argparse.Namespace(bos=lambda: 0, eos=lambda: 2, pad=lambda: 1))
    systems = [(n, argparse.Namespace(name=n), task, None, False) for n in ("a", "b")]
    args = argparse.Namespace(split="valid", max_sentences=2, warmup=0, large_batch=4, memory_batches=[])
    benchmark.measure_all(systems, args, torch.device("cpu"))
    want = []
    for i in ("s0", "s1"):
        for n in ("a", "b"):
            want += [(n, i), "clock", (n, i), "clock"]
    assert calls[:len(want)] == want
