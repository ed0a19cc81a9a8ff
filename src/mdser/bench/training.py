"""Train-step timings: the library's `RowTrainer` on synthetic IEMOCAP-like utterances.

`Trainer` is the reference path every timing goes through (the model and traced step of
`fit_fold`, timed batch by batch). On it: `training_profile` (length-bucketed batches
against one utterance per batch, and the masked equality of their outputs),
`batch_budget_sweep` and `trace_cost`; `profiles` names the model parameters benchmarked
and `run_training` times each of them. `sweep_in_fold_process` runs the sweep in a fresh
interpreter configured as a fold process trains:

    python -m mdser.bench.training UTTERANCES BUDGET...
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import pandas as pd

from mdser.bench import ROOT, log, print_result, read_result, run_job
from mdser.bench.data import FRAMES_PER_S, IEMOCAP, no_standardization, synthetic_set
from mdser.bench.flops import model_flops

DEFAULT_ROW = "mdcnn-ff-spp-att-arcface"
PLAIN_ROW = "cnn-gmp-softmax"


def profiles(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The model parameters benchmarked: paper profile (the default row at the paper's
    128 filters, README "The paper's profile"), default profile, plain CNN."""
    from mdser.params import row_model

    return {
        "paper": row_model(params, DEFAULT_ROW) | {"filters": 128},
        "default": row_model(params, DEFAULT_ROW),
        "plain": row_model(params, PLAIN_ROW),
    }


class Trainer:
    """The library's `RowTrainer` (the model and traced step of `fit_fold`), timed."""

    def __init__(self, model_params: dict[str, Any], train: dict[str, Any],
                 head_params: dict[str, Any], n_classes: int, n_mels: int, steps_per_cycle: int = 10):
        from mdser.training import RowTrainer

        self.row = RowTrainer(model_params, train, head_params, n_classes, n_mels)
        self.row.start_fold(train["seed"], steps_per_cycle)
        self.model, self.step = self.row.model, self.row.train_step
        self.flops = model_flops(self.model)
        self.head = model_params["head"]

    def run(self, frames: np.ndarray, rows: pd.DataFrame, labels: np.ndarray,
            weights: np.ndarray, groups: list[np.ndarray], mean: np.ndarray,
            std: np.ndarray) -> dict[str, Any]:
        """Train on `groups` (positions into `rows`), timing host batching and steps."""
        from mdser.batching import TIME_QUANTUM, pad_batch

        prep_s, real, padded, losses = 0.0, 0, 0, []
        t0 = time.perf_counter()
        for idx in groups:
            t1 = time.perf_counter()
            x, lengths = pad_batch(frames, rows.iloc[idx], mean, std)
            prep_s += time.perf_counter() - t1
            y = labels[idx].astype(np.int32)
            losses.append(self.step(x, lengths, y, weights[y]))
            real += int(lengths.sum())
            padded += int(x.shape[2]) * len(idx)
        final = [float(v) for v in losses]  # one host sync at the end
        wall = time.perf_counter() - t0
        f = self.flops
        n = int(sum(len(g) for g in groups))
        useful = real * f["train_flop_per_frame"] + n * f["train_flop_per_utt"]
        executed = padded * f["train_flop_per_frame"] + n * f["train_flop_per_utt"]
        return {
            "utterances": n, "batches": len(groups), "wall_s": wall, "host_prep_s": prep_s,
            "utt_per_s": n / wall, "frames_per_s": real / wall, "real_frames": real,
            "padded_frames": padded, "padding_overhead": padded / max(real, 1) - 1.0,
            "time_quantum": TIME_QUANTUM, "useful_flops": useful / wall,
            "executed_flops": executed / wall, "loss_finite": bool(np.isfinite(final).all()),
        }


def masked_equality(model: Any, head: str, head_params: dict[str, Any], frames: np.ndarray,
                    rows: pd.DataFrame, batch_frames: int) -> dict[str, Any]:
    """Max |p_bucketed - p_alone| of the class probabilities (library `Predictor`)."""
    from mdser.batching import Predictor, length_batches

    mean, std = no_standardization()
    predict = Predictor(model, head, head_params)
    together = predict(frames, rows, mean, std, batch_frames)
    alone = predict(frames, rows, mean, std, 1)  # budget 1 frame: one utterance per batch
    sizes = [len(b) for b in length_batches(rows["frames"].to_numpy(), batch_frames)]
    return {"utterances": len(rows), "largest_batch": max(sizes),
            "max_abs_diff": float(np.abs(together - alone).max()),
            "argmax_equal": bool((together.argmax(1) == alone.argmax(1)).all())}


def training_profile(name: str, model_params: dict[str, Any], params: dict[str, Any],
                     n_utts: int, n_naive: int, n_equal: int, batch_frames: int,
                     seed: int = 0, n_classes: int = IEMOCAP["classes"]) -> dict[str, Any]:
    """Bucketed vs one-per-batch training on the same IEMOCAP-like utterances."""
    from mdser.batching import length_batches
    from mdser.training import class_weights

    n_mels = params["features"]["n_mels"]
    lengths, frames, rows, labels = synthetic_set(n_utts, n_mels, n_classes, seed)
    train = params["train"] | {"batch_frames": batch_frames}
    weights = class_weights(labels, n_classes, train["class_weight_alpha"]).astype(np.float32)
    mean, std = no_standardization()
    t0 = time.perf_counter()
    trainer = Trainer(model_params, train, params[model_params["head"]], n_classes, n_mels)
    build_s = time.perf_counter() - t0
    groups = length_batches(lengths, batch_frames, np.random.default_rng(seed + 1))
    t0 = time.perf_counter()
    trainer.run(frames, rows, labels, weights, groups[:1], mean, std)  # trace + warm-up
    first_step_s = time.perf_counter() - t0
    log(f"{name}: {n_utts} utterances in {len(groups)} batches; first step {first_step_s:.1f} s")
    bucketed = trainer.run(frames, rows, labels, weights, groups, mean, std)
    log(f"{name}: bucketed {bucketed['utt_per_s']:.2f} utt/s")
    # one per batch, on the first n_naive of the same utterances (same order of lengths)
    naive_ids = np.arange(min(n_naive, n_utts))
    naive = trainer.run(frames, rows, labels, weights, [np.array([i]) for i in naive_ids],
                        mean, std)
    # the bucketed figure on exactly those utterances, for a same-utterances ratio
    same_groups = length_batches(lengths[naive_ids], batch_frames, np.random.default_rng(seed))
    same = trainer.run(frames, rows, labels, weights, same_groups, mean, std)
    log(f"{name}: one-per-batch {naive['utt_per_s']:.2f} utt/s")
    # fixed cost of one step: a single 32-frame utterance (median of 5)
    short = np.array([int(np.argmin(lengths))])
    tiny_rows = rows.iloc[short].assign(frames=min(32, int(lengths[short[0]])))
    tiny = [trainer.run(frames, tiny_rows.reset_index(drop=True), labels[short], weights,
                        [np.array([0])], mean, std)["wall_s"] for _ in range(5)]
    eq_rows = rows.iloc[: min(n_equal, n_utts)].reset_index(drop=True)
    equality = masked_equality(trainer.model, trainer.head, params[trainer.head], frames, eq_rows,
                               batch_frames)
    return {
        "model": model_params, "flops": trainer.flops, "batch_frames": batch_frames,
        "lengths_s": {"mean": float(lengths.mean() / FRAMES_PER_S),
                      "min": float(lengths.min() / FRAMES_PER_S),
                      "max": float(lengths.max() / FRAMES_PER_S)},
        "build_s": build_s, "first_step_s": first_step_s,
        "tracings": int(trainer.step.experimental_get_tracing_count()),
        "step_overhead_s": float(np.median(tiny)),
        "one_per_batch_step_s": naive["wall_s"] / max(naive["utterances"], 1),
        "bucketed": bucketed, "one_per_batch": naive, "bucketed_same_utterances": same,
        "speedup_vs_one_per_batch": same["utt_per_s"] / naive["utt_per_s"],
        "equality": equality,
    }


def batch_budget_sweep(model_params: dict[str, Any], params: dict[str, Any], n_utts: int,
                       budgets: list[int], seed: int = 0, n_classes: int = 4) -> dict[str, Any]:
    """Utterances/s of one traced step over the same utterances at several batch budgets."""
    from mdser.batching import length_batches
    from mdser.training import class_weights

    lengths, frames, rows, labels = synthetic_set(n_utts, params["features"]["n_mels"],
                                                  n_classes, seed)
    weights = class_weights(labels, n_classes).astype(np.float32)
    mean, std = no_standardization()
    trainer = Trainer(model_params, params["train"], params[model_params["head"]], n_classes, frames.shape[1])
    trainer.run(frames, rows, labels, weights, [np.arange(2)], mean, std)  # trace
    out = {}
    for budget in budgets:
        groups = length_batches(lengths, budget, np.random.default_rng(seed + 1))
        res = trainer.run(frames, rows, labels, weights, groups, mean, std)
        out[str(budget)] = {k: res[k] for k in ("utt_per_s", "useful_flops", "batches",
                                                "padding_overhead", "wall_s")}
        out[str(budget)]["mean_batch_size"] = n_utts / res["batches"]
    return {"utterances": n_utts, "budgets": out}


def sweep_in_fold_process(n_utts: int, budgets: list[int]) -> dict[str, Any]:
    """`batch_budget_sweep` of the default profile in a fresh interpreter with one thread per
    op (`row_training.start_fold_process`, `runtime.configure`) and Python's collector
    frozen, as `train_row`'s fold processes train; the benchmark's own process runs every
    op on all cores, where larger batches pay more."""
    result = read_result(run_job("mdser.bench.training", str(n_utts), *map(str, budgets)))
    return result | {"configuration": "fold process (one thread per op)"}


def trace_cost(model_params: dict[str, Any], params: dict[str, Any], n_classes: int = 4
               ) -> dict[str, Any]:
    """First-step time of a row's first fold (traces) and of its next fold (reuses the trace)."""
    from mdser.batching import pad_batch

    _, frames, rows, labels = synthetic_set(4, params["features"]["n_mels"], n_classes)
    x, n = pad_batch(frames, rows, *no_standardization())
    y, w = labels.astype(np.int32), np.ones(len(labels), np.float32)
    trainer = Trainer(model_params, params["train"], params[model_params["head"]], n_classes, x.shape[1])
    out = {}
    for key in ("first_fold", "next_fold"):
        if key == "next_fold":
            trainer.row.start_fold(params["train"]["seed"] + 1, 10)
        t0 = time.perf_counter()
        float(trainer.step(x, n, y, w))
        out[key] = {"first_step_s": time.perf_counter() - t0,
                    "tracings": int(trainer.step.experimental_get_tracing_count())}
    return out


def run_training(params: dict[str, Any], prof: dict[str, dict[str, Any]],
                 size: dict[str, Any]) -> dict[str, Any]:
    """`training_profile` of the plain, default and paper profiles at the run's sizes."""
    bf = params["train"]["batch_frames"]
    out = {}
    out["plain"] = training_profile("plain", prof["plain"], params, size["default_utts"],
                                    size["default_naive_utts"], size["equality_utts"], bf)
    out["default"] = training_profile("default", prof["default"], params, size["default_utts"],
                                      size["default_naive_utts"], size["equality_utts"], bf)
    out["paper"] = training_profile("paper", prof["paper"], params, size["paper_utts"],
                                    size["paper_naive_utts"], size["paper_equality_utts"],
                                    size["paper_batch_frames"] or bf)
    return out


def main(argv: list[str] | None = None) -> None:
    from mdser.params import load_params
    from mdser.row_training import start_fold_process
    from mdser.training import frozen_heap

    n_utts, *budgets = argv or sys.argv[1:]
    params = load_params(ROOT / "params.yaml")
    start_fold_process(None)
    with frozen_heap():
        sweep = batch_budget_sweep(profiles(params)["default"], params, int(n_utts),
                                   [int(b) for b in budgets])
    import tensorflow as tf

    print_result(sweep | {"intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
                          "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads()})


if __name__ == "__main__":
    main()
