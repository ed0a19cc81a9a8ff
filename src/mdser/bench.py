"""Benchmark: time to the ablation table, against the naive way and the machine's limit.

    python -m mdser.bench [--quick] [--out bench/results.json] [--skip-dvc]

One run measures, side by side on the same machine:

1. the float32 matmul peak (tf.matmul, large square matrices, best of several);
2. training throughput (utterances/s, FLOP/s) of the paper profile and the default
   profiles on IEMOCAP-like lengths, length-bucketed (``length_batches`` + ``pad_batch``)
   against one utterance per batch, and the masked equality of their outputs;
3. feature extraction (``build_audio_store`` + ``build_feature_store``) against a plain
   per-file librosa loop, with peak memory (RSS incl. children) at 1x and 2x the corpus;
4. the work DVC avoids (full / no-op ``dvc repro``, ``dvc exp run -S arcface.s=3``);
5. growth of epoch time and feature-store size at 1x, 2x, 4x the built-in corpus;
6. GPU figures when a GPU is present, and the projected wall time of the full
   paper-profile ablation (10 rows x 10 folds, IEMOCAP and EMODB sizes).

FLOPs are counted analytically from the model's Conv2D/Dense shapes: 2 x MACs per
forward pass, x 3 for a training step (forward + backward). Element-wise ops (bias,
LeakyReLU, masking, pooling) are not counted. Writes ``--out`` (JSON) and a report
(Markdown) beside it. Nothing here is part of the test suite's timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[2]
TARGETS = {
    "train_fraction_of_peak": 0.50,  # paper profile, useful FLOP/s / matmul peak
    "bucketed_speedup": 5.0,  # length-bucketed vs one utterance per batch (utterances/s)
    "equality_atol": 1e-5,  # max |p_bucketed - p_alone| over class probabilities
    "feature_speedup": 2.0,  # resample + featurize vs the plain librosa loop
    "memory_growth": 1.2,  # peak memory at 2x corpus / at 1x corpus
    "full_repro_s": 15 * 60,  # whole default `dvc repro` on 2 cores without a GPU
    "linearity": 0.2,  # per-utterance cost at 4x within +-20 % of 1x
}
IEMOCAP = {"utterances": 2943, "mean_s": 4.5, "classes": 4}  # improvised, 4 classes
EMODB = {"utterances": 535, "mean_s": 2.8, "classes": 7}
SIZES = {
    "quick": {
        "matmul_n": 2048, "matmul_repeats": 3,
        "default_utts": 48, "default_naive_utts": 48,
        "paper_utts": 6, "paper_naive_utts": 3, "paper_batch_frames": 1500,
        "equality_utts": 8, "paper_equality_utts": 3,
        "corpus_utts": 40, "growth_factors": [1, 2, 4], "naive_feature_factors": [1, 4],
        "dvc_rows": ["cnn-gmp-softmax", "mdcnn-ff-spp-att-arcface"],
    },
    "full": {
        "matmul_n": 4096, "matmul_repeats": 5,
        "default_utts": 160, "default_naive_utts": 160,
        "paper_utts": 24, "paper_naive_utts": 8, "paper_batch_frames": None,
        "equality_utts": 24, "paper_equality_utts": 4,
        "corpus_utts": None, "growth_factors": [1, 2, 4], "naive_feature_factors": [1, 4],
        "dvc_rows": None,
    },
}
DEFAULT_ROW = "mdcnn-ff-spp-att-arcface"
PLAIN_ROW = "cnn-gmp-softmax"
FRAMES_PER_S = 100  # 10 ms hop


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    import keras
    import psutil
    import tensorflow as tf

    from mdser.runtime import cpu_model, device_name

    cpu = cpu_model()
    gpus = tf.config.list_physical_devices("GPU")
    gpu = "none"
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        gpu = f"{len(gpus)}x {details.get('device_name', gpus[0].name)}"
    return {
        "cpu": cpu, "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu, "device": device_name(), "python": platform.python_version(),
        "tensorflow": tf.__version__, "keras": keras.__version__, "platform": platform.platform(),
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
    }


def matmul_peak(n: int = 4096, repeats: int = 5) -> dict[str, Any]:
    """Best-of-`repeats` float32 tf.matmul throughput on n x n matrices (FLOP = 2 n^3)."""
    import tensorflow as tf

    a = tf.random.stateless_normal((n, n), seed=(1, 2), dtype=tf.float32)
    b = tf.random.stateless_normal((n, n), seed=(3, 4), dtype=tf.float32)
    tf.matmul(a, b).numpy()  # warm-up (thread pool, oneDNN primitives)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tf.matmul(a, b).numpy()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"n": n, "repeats": repeats, "best_s": best, "flops": 2.0 * n**3 / best,
            "median_flops": 2.0 * n**3 / float(np.median(times))}


# ----------------------------------------------------------------------------- profiles


def profiles(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The model parameters benchmarked: paper profile, default profile, plain CNN."""
    from mdser.params import row_model

    paper = row_model(params, DEFAULT_ROW) | {"filters": 128}
    paper_file = ROOT / "params-paper.yaml"
    if paper_file.exists():  # the repository's own paper profile, where present
        model = (yaml.safe_load(paper_file.read_text()) or {}).get("model") or {}
        row = params["ablation"]["rows"][DEFAULT_ROW]
        paper |= {k: v for k, v in model.items() if k in paper}
        paper |= {k: v for k, v in row.items() if v is not None}
    return {
        "paper": paper,
        "default": row_model(params, DEFAULT_ROW),
        "plain": row_model(params, PLAIN_ROW),
    }


def model_flops(model: Any) -> dict[str, float]:
    """Analytic forward MACs of a built model: per input frame (convs) and per utterance.

    Layer 1 (names ``layer1_*``) runs at the input's time resolution; every later conv
    after the 2x2 pooling at half of it. Frequency size and channels are static.
    """
    import keras

    per_frame, per_utt, conv_layers = 0.0, 0.0, 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            f_in, c_in = layer.input.shape[1], layer.input.shape[-1]
            time_scale = 1.0 if layer.name.startswith("layer1_") else 0.5
            per_frame += f_in * time_scale * kh * kw * c_in * layer.filters
            conv_layers += 1
        elif isinstance(layer, keras.layers.Dense):
            per_utt += float(np.prod(layer.input.shape[1:])) * layer.units
        elif hasattr(layer, "kernel") and hasattr(layer, "n_classes"):  # CosineClassifier
            per_utt += float(np.prod(layer.kernel.shape))
        elif hasattr(layer, "units") and hasattr(layer, "w"):  # BinAttention
            bins = layer.input.shape[1]
            per_utt += bins * float(np.prod(layer.w.shape))
    return {
        "conv_layers": conv_layers,
        "fwd_flop_per_frame": 2.0 * per_frame,
        "fwd_flop_per_utt": 2.0 * per_utt,
        "train_flop_per_frame": 6.0 * per_frame,
        "train_flop_per_utt": 6.0 * per_utt,
        "params": int(model.count_params()),
    }


# ----------------------------------------------------------------------------- training


def synthetic_lengths(n: int, rng: np.random.Generator, mean_s: float = 4.5,
                      lo_s: float = 0.6, hi_s: float = 30.0, sigma: float = 0.6) -> np.ndarray:
    """IEMOCAP-like utterance lengths in frames: log-normal, mean ~ mean_s, clipped."""
    mu = np.log(mean_s) - sigma**2 / 2
    seconds = np.clip(rng.lognormal(mu, sigma, n), lo_s, hi_s)
    return np.maximum(np.round(seconds * FRAMES_PER_S), 2).astype(np.int64)


def synthetic_store(lengths: np.ndarray, n_mels: int, n_classes: int, rng: np.random.Generator
                    ) -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """A feature store in memory shaped like `open_features`: (frames, index, labels)."""
    frames = rng.standard_normal((int(lengths.sum()), n_mels, 3), dtype=np.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    index = pd.DataFrame({"utt_id": [f"u{i:05d}" for i in range(lengths.size)],
                          "offset": offsets, "frames": lengths})
    labels = np.arange(lengths.size) % n_classes
    return frames, index, rng.permutation(labels).astype(np.int32)


class Trainer:
    """The library's `RowTrainer` (the model and traced step of `fit_fold`), timed."""

    def __init__(self, model_params: dict[str, Any], train: dict[str, Any],
                 heads: dict[str, Any], n_classes: int, n_mels: int, steps_per_cycle: int = 10):
        from mdser.training import RowTrainer

        self.row = RowTrainer(model_params, train, heads, n_classes, n_mels)
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


def masked_equality(model: Any, head: str, arcface: dict[str, Any], frames: np.ndarray,
                    rows: pd.DataFrame, batch_frames: int) -> dict[str, Any]:
    """Max |p_bucketed - p_alone| of the class probabilities (library `Predictor`)."""
    from mdser.batching import Predictor, length_batches

    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
    predict = Predictor(model, head, arcface)
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

    rng = np.random.default_rng(seed)
    lengths = synthetic_lengths(n_utts, rng)
    n_mels = params["features"]["n_mels"]
    frames, rows, labels = synthetic_store(lengths, n_mels, n_classes, rng)
    train = params["train"] | {"batch_frames": batch_frames}
    heads = {"arcface": params["arcface"], "softmax": params["softmax"]}
    weights = class_weights(labels, n_classes, train["class_weight_alpha"]).astype(np.float32)
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
    t0 = time.perf_counter()
    trainer = Trainer(model_params, train, heads, n_classes, n_mels)
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
    equality = masked_equality(trainer.model, trainer.head, heads["arcface"], frames, eq_rows,
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

    rng = np.random.default_rng(seed)
    lengths = synthetic_lengths(n_utts, rng)
    frames, rows, labels = synthetic_store(lengths, params["features"]["n_mels"], n_classes, rng)
    weights = class_weights(labels, n_classes).astype(np.float32)
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
    heads = {"arcface": params["arcface"], "softmax": params["softmax"]}
    trainer = Trainer(model_params, params["train"], heads, n_classes, frames.shape[1])
    trainer.run(frames, rows, labels, weights, [np.arange(2)], mean, std)  # trace
    out = {}
    for budget in budgets:
        groups = length_batches(lengths, budget, np.random.default_rng(seed + 1))
        res = trainer.run(frames, rows, labels, weights, groups, mean, std)
        out[str(budget)] = {k: res[k] for k in ("utt_per_s", "useful_flops", "batches",
                                                "padding_overhead", "wall_s")}
        out[str(budget)]["mean_batch_size"] = n_utts / res["batches"]
    return {"utterances": n_utts, "budgets": out}


def trace_cost(model_params: dict[str, Any], params: dict[str, Any], n_classes: int = 4
               ) -> dict[str, Any]:
    """First-step time of a row's first fold (traces) and of its next fold (reuses the trace)."""
    from mdser.batching import pad_batch

    rng = np.random.default_rng(0)
    lengths = synthetic_lengths(4, rng)
    frames, rows, labels = synthetic_store(lengths, params["features"]["n_mels"], n_classes, rng)
    x, n = pad_batch(frames, rows, np.zeros(3, np.float32), np.ones(3, np.float32))
    y, w = labels.astype(np.int32), np.ones(len(labels), np.float32)
    heads = {"arcface": params["arcface"], "softmax": params["softmax"]}
    trainer = Trainer(model_params, params["train"], heads, n_classes, x.shape[1])
    out = {}
    for key in ("first_fold", "next_fold"):
        if key == "next_fold":
            trainer.row.start_fold(params["train"]["seed"] + 1, 10)
        t0 = time.perf_counter()
        float(trainer.step(x, n, y, w))
        out[key] = {"first_step_s": time.perf_counter() - t0,
                    "tracings": int(trainer.step.experimental_get_tracing_count())}
    return out


# ----------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory of a process and all its children, sampled every `interval` s.

    ``peak_rss``: sum of RSS (counts pages shared between a parent and its forked workers
    once per process, and file-backed memory-map pages); ``peak_pss``: sum of PSS (shared
    pages divided among their sharers: the memory the process tree really holds);
    ``peak_anon``: sum of RSS minus shared pages (heap, not memory maps).
    """

    def __init__(self, pid: int | None = None, interval: float = 0.05):
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = self.peak_anon = 0
        self._stop = threading.Event()

    def _measure(self) -> None:
        import psutil

        rss = pss = anon = 0
        try:
            top = psutil.Process(self.pid)
            procs = [top, *top.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            try:
                m = p.memory_full_info()
            except psutil.Error:
                continue
            rss += m.rss
            pss += getattr(m, "pss", m.rss)
            anon += m.rss - getattr(m, "shared", 0)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_anon = max(self.peak_anon, anon)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._measure()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._measure()  # a last sample (no-op once a monitored process has exited)


# ----------------------------------------------------------------------------- features


def make_corpus(params: dict[str, Any], utterances: int, raw_dir: Path) -> pd.DataFrame:
    """The built-in synthetic corpus with `utterances` utterances; its kept manifest."""
    from mdser.corpora import prepare

    data = params["data"] | {"corpus": "synth"}
    data["synth"] = data["synth"] | {"utterances": utterances}
    manifest, _ = prepare(data, raw_dir)
    return manifest


def in_fresh_process(fn: str, *args: str) -> dict[str, Any]:
    """Run `mdser.bench.<fn>(*args)` in a fresh interpreter (no TensorFlow loaded, as in
    a DVC stage); return its JSON result with the peak memory of its process tree."""
    code = ("import json, sys; from mdser import bench; "
            f"print('@@' + json.dumps(bench.{fn}(*sys.argv[1:])))")
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    with PeakMemory(proc.pid) as mem:
        out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{fn} failed ({proc.returncode}):\n{err[-3000:]}")
    result = json.loads(next(x for x in out.splitlines() if x.startswith("@@"))[2:])
    return result | {"peak_rss_mib": mem.peak_rss / 2**20, "peak_pss_mib": mem.peak_pss / 2**20,
                     "peak_anon_mib": mem.peak_anon / 2**20}


def _features_job(kind: str, manifest_csv: str, raw_dir: str, work: str) -> dict[str, Any]:
    from mdser.corpora import read_manifest
    from mdser.params import load_params

    params = load_params(ROOT / "params.yaml")
    manifest = read_manifest(Path(manifest_csv))
    if kind == "repo":
        return repo_features(params, manifest, Path(raw_dir), Path(work))
    return librosa_loop(params, manifest, Path(raw_dir))


def repo_features(params: dict[str, Any], manifest: pd.DataFrame, raw_dir: Path, work: Path
                  ) -> dict[str, Any]:
    """The repository's resample + featurize, timed with their imports (as a stage pays them)."""
    audio, feats = work / "audio", work / "features"
    for d in (audio, feats):
        shutil.rmtree(d, ignore_errors=True)
    audio.mkdir(parents=True)
    sr = params["audio"]["sample_rate"]
    t0 = time.perf_counter()
    from mdser.features import build_feature_store
    from mdser.stores import build_audio_store, write_meta

    build_audio_store(manifest, raw_dir, audio, sr)
    write_meta(audio, {"sample_rate": sr, "manifest_sha256": "bench"})
    t1 = time.perf_counter()
    index = build_feature_store(audio, feats, params["features"])
    t2 = time.perf_counter()
    kept = manifest[manifest["status"] == "kept"]
    seconds = float(kept["duration"].sum())
    size = sum(p.stat().st_size for p in feats.iterdir())
    return {
        "utterances": len(kept), "audio_s": seconds, "resample_s": t1 - t0,
        "featurize_s": t2 - t1, "wall_s": t2 - t0, "audio_s_per_s": seconds / (t2 - t0),
        "store_bytes": size, "workers": os.cpu_count(), "frames": int(index["frames"].sum()),
        "feature_store": str(feats),
    }


def librosa_loop(params: dict[str, Any], manifest: pd.DataFrame, raw_dir: Path
                 ) -> dict[str, Any]:
    """The naive way: per file librosa.load(sr=16k), melspectrogram, delta twice; timed with
    librosa's import and its lazy submodules' (as a stage pays them)."""
    from mdser.corpora import resolve_path

    f, sr = params["features"], params["audio"]["sample_rate"]
    win, hop = round(f["win_ms"] * sr / 1000), round(f["hop_ms"] * sr / 1000)
    kept = manifest[manifest["status"] == "kept"]
    frames = 0
    t0 = time.perf_counter()
    import librosa

    for r in kept.itertuples():
        y, _ = librosa.load(resolve_path(r.path, raw_dir), sr=sr)
        s = np.log(librosa.feature.melspectrogram(
            y=y, sr=sr, n_fft=f["n_fft"], win_length=win, hop_length=hop, window="hamming",
            n_mels=f["n_mels"], htk=True) + 1e-10)
        d1 = librosa.feature.delta(s, width=2 * f["delta_n"] + 1)
        d2 = librosa.feature.delta(d1, width=2 * f["delta_n"] + 1)
        frames += np.stack([s, d1, d2], axis=-1).shape[1]
    wall = time.perf_counter() - t0
    seconds = float(kept["duration"].sum())
    return {"utterances": len(kept), "audio_s": seconds, "wall_s": wall,
            "audio_s_per_s": seconds / wall, "frames": frames}


def feature_profile(params: dict[str, Any], manifest: pd.DataFrame, raw_dir: Path,
                    n: int = 20) -> dict[str, Any]:
    """Single-process time split of the library's per-utterance work (for the profile)."""
    from mdser import audio
    from mdser.corpora import resolve_path
    from mdser.features import delta, log_mel

    f, sr = params["features"], params["audio"]["sample_rate"]
    split = {"read_s": 0.0, "resample_s": 0.0, "log_mel_s": 0.0, "delta_x2_s": 0.0,
             "librosa_delta_x2_s": 0.0}
    import librosa

    kept = manifest[manifest["status"] == "kept"].head(n)
    for r in kept.itertuples():
        t0 = time.perf_counter()
        y, in_sr = audio.read_audio(resolve_path(r.path, raw_dir))
        t1 = time.perf_counter()
        y = audio.resample(audio.to_mono(y), in_sr, sr)
        t2 = time.perf_counter()
        spec = log_mel(y, sr, f)
        t3 = time.perf_counter()
        delta(delta(spec, f["delta_n"]), f["delta_n"])
        t4 = time.perf_counter()
        d1 = librosa.feature.delta(spec.T, width=2 * f["delta_n"] + 1)
        librosa.feature.delta(d1, width=2 * f["delta_n"] + 1)
        t5 = time.perf_counter()
        for key, dt in zip(split, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            split[key] += dt
    split["utterances"] = len(kept)
    split["audio_s"] = float(kept["duration"].sum())
    return split


def growth_epoch(params: dict[str, Any], store: Path, model_params: dict[str, Any],
                 trainer: Trainer | None = None) -> tuple[dict[str, Any], Trainer]:
    """One training epoch (bucketed, default batch budget) over a whole feature store.

    Pass the `trainer` of an earlier call to reuse its traced step (no new trace)."""
    from mdser.batching import length_batches
    from mdser.corpora import class_names
    from mdser.features import standardization
    from mdser.splits import encode_labels
    from mdser.stores import open_features
    from mdser.training import class_weights

    index, frames = open_features(store)
    classes = class_names(params["data"] | {"corpus": "synth"})
    labels = encode_labels(index, classes).astype(np.int32)
    train = params["train"]
    heads = {"arcface": params["arcface"], "softmax": params["softmax"]}
    weights = class_weights(labels, len(classes), train["class_weight_alpha"]).astype(np.float32)
    mean, std = standardization(frames, index)
    groups = length_batches(index["frames"].to_numpy(), train["batch_frames"],
                            np.random.default_rng(0))
    if trainer is None:
        trainer = Trainer(model_params, train, heads, len(classes), frames.shape[1])
        trainer.run(frames, index, labels, weights, groups[:1], mean, std)  # trace
    # best of two epochs: the first one also pays for padded shapes not seen before
    epoch = min((trainer.run(frames, index, labels, weights, groups, mean, std) for _ in range(2)),
                key=lambda e: e["wall_s"])
    return {"utterances": len(index), "frames": int(index["frames"].sum()),
            "epoch_s": epoch["wall_s"], "s_per_utt": epoch["wall_s"] / len(index),
            "s_per_kframe": 1000 * epoch["wall_s"] / int(index["frames"].sum()),
            "batches": epoch["batches"], "host_prep_s": epoch["host_prep_s"]}, trainer


# ----------------------------------------------------------------------------- DVC


def _env(repo: Path) -> dict[str, str]:
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(repo / "src"),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", *args],
                   cwd=repo, check=True, capture_output=True, env=_env(repo))


def copy_repo(dest: Path, shrink: Callable[[dict], dict] | None = None) -> Path:
    """The repository's tracked shape (no data, caches or results) as a fresh git repo."""
    for name in ["dvc.yaml", "params.yaml", "pyproject.toml", ".gitignore", "stages", "src",
                 ".dvc/config"]:
        src, dst = ROOT / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(src, dst)
    (dest / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    if shrink is not None:
        params = shrink(yaml.safe_load((dest / "params.yaml").read_text()))
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True, capture_output=True)
    _git(dest, "add", "-A")
    _git(dest, "commit", "-q", "-m", "bench copy")
    return dest


STAGE_LINE = re.compile(r"Running stage '([^']+)'")


def timed_dvc(repo: Path, *args: str, timeout: float | None = None) -> dict[str, Any]:
    """Run a dvc command, timestamping its output lines: wall time per stage that ran."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(["dvc", *args], cwd=repo, env=_env(repo), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    starts: list[tuple[str, float]] = []
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        m = STAGE_LINE.search(line)
        if m:
            starts.append((m.group(1), time.perf_counter() - t0))
    rc = proc.wait(timeout=timeout)
    wall = time.perf_counter() - t0
    stages = {}
    for i, (stage, start) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else wall
        stages[stage] = round(end - start, 2)
    return {"cmd": "dvc " + " ".join(args), "rc": rc, "wall_s": wall, "stages_run": stages,
            "tail": lines[-8:] if rc else []}


def dvc_work(rows: list[str] | None, quick: bool, work: Path) -> dict[str, Any]:
    """Full repro, no-op repro and an ArcFace-only experiment in a fresh copy."""
    def shrink(params: dict) -> dict:
        if rows:
            params["ablation"]["rows"] = {r: params["ablation"]["rows"][r] for r in rows}
        if quick:
            params["data"]["synth"].update(utterances=70)
            params["model"].update(filters=4, attention_units=8, fc_units=8)
            params["train"].update(folds=1, max_epochs=1)
        return params

    repo = copy_repo(work / "repo", shrink)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    row_names = list(params["ablation"]["rows"])
    log(f"dvc: full repro of {len(row_names)} rows in {repo}")
    full = timed_dvc(repo, "repro")
    log(f"dvc: full repro {full['wall_s']:.0f} s (rc {full['rc']})")
    noop = timed_dvc(repo, "repro")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "after repro")
    exp = timed_dvc(repo, "exp", "run", "-S", "arcface.s=3")
    log(f"dvc: no-op {noop['wall_s']:.1f} s, exp run {exp['wall_s']:.0f} s")
    arcface_rows = [r for r in row_names if params["ablation"]["rows"][r]["head"] == "arcface"]
    expected = {f"{s}@{r}" for s in ("train", "evaluate") for r in arcface_rows} | {"ablate"}
    data_stages = ("download", "resample", "featurize", "split")
    ran = set(exp["stages_run"])
    return {
        "shrunk": quick, "rows": row_names, "full_repro": full, "noop_repro": noop,
        "exp_run_arcface_s3": exp,
        "exp_data_stage_s": sum(exp["stages_run"].get(s, 0.0) for s in data_stages),
        "exp_expected_stages": sorted(expected), "exp_only_expected": ran == expected,
        "full_data_stage_s": {s: full["stages_run"].get(s) for s in data_stages},
        "full_train_s": sum(v for k, v in full["stages_run"].items() if k.startswith("train@")),
        "full_evaluate_s": sum(v for k, v in full["stages_run"].items()
                               if k.startswith("evaluate@")),
    }


# ----------------------------------------------------------------------------- GPU


def gpu_figures(params: dict[str, Any], paper: dict[str, Any], n_utts: int,
                batch_frames: int) -> dict[str, Any]:
    """Paper-profile training with and without mixed precision and XLA (GPU only)."""
    import keras
    import tensorflow as tf

    from mdser.batching import length_batches
    from mdser.training import class_weights

    if not tf.config.list_physical_devices("GPU"):
        return {"present": False, "note": "no GPU present"}
    out: dict[str, Any] = {"present": True, "runs": {}}
    rng = np.random.default_rng(0)
    lengths = synthetic_lengths(n_utts, rng)
    n_mels, n_classes = params["features"]["n_mels"], IEMOCAP["classes"]
    frames, rows, labels = synthetic_store(lengths, n_mels, n_classes, rng)
    weights = class_weights(labels, n_classes).astype(np.float32)
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
    heads = {"arcface": params["arcface"], "softmax": params["softmax"]}
    groups = length_batches(lengths, batch_frames, np.random.default_rng(1))
    for mixed in (False, True):
        for xla in (False, True):
            name = f"{'mixed' if mixed else 'fp32'}{'+xla' if xla else ''}"
            train = params["train"] | {"mixed_precision": mixed, "xla": xla}
            try:
                trainer = Trainer(paper, train, heads, n_classes, n_mels)
                trainer.run(frames, rows, labels, weights, groups[:2], mean, std)
                with GpuUtilization() as util:
                    res = trainer.run(frames, rows, labels, weights, groups, mean, std)
                res["gpu_utilization_pct"] = util.mean
                out["runs"][name] = res
            except Exception as exc:  # report, keep going
                out["runs"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            finally:
                keras.mixed_precision.set_global_policy("float32")
    return out


class GpuUtilization:
    """Mean `nvidia-smi` GPU utilization while the block runs (None without nvidia-smi)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=5).stdout.split()
                self.samples.append(float(out[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return
            self._stop.wait(0.2)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None

    def __enter__(self) -> GpuUtilization:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def project_ablation(params: dict[str, Any], paper: dict[str, Any], achieved_flops: float,
                     epochs: int, folds: int = 10) -> dict[str, Any]:
    """Wall time of the full paper-profile ablation from a measured FLOP/s.

    Per row and corpus: folds x epochs x (training step FLOPs over 80 % of the corpus +
    a validation forward pass over 10 %), at the measured FLOP/s of the paper profile.
    """
    from mdser.model import build_model

    rows = params["ablation"]["rows"]
    corpora = {"iemocap": IEMOCAP, "emodb": EMODB}
    per_row = {}
    total = 0.0
    for row, overrides in rows.items():
        mp = paper | {k: v for k, v in overrides.items() if v is not None}
        f = model_flops(build_model(mp, 4, n_mels=params["features"]["n_mels"]))
        secs = {}
        for name, c in corpora.items():
            frames = c["utterances"] * c["mean_s"] * FRAMES_PER_S
            epoch = (0.8 * frames * f["train_flop_per_frame"]
                     + 0.1 * frames * f["fwd_flop_per_frame"]) / achieved_flops
            secs[name] = folds * epochs * epoch
        per_row[row] = {"train_gflop_per_frame": f["train_flop_per_frame"] / 1e9, **secs}
        total += sum(secs.values())
    return {"rows": len(rows), "folds": folds, "epochs": epochs,
            "achieved_flops_used": achieved_flops, "per_row_s": per_row,
            "total_s": total, "total_h": total / 3600,
            "assumption": ("every row runs at the paper profile's measured useful FLOP/s; "
                           "10 speaker folds, 80 % train / 10 % validation; epochs as given "
                           "(the paper does not state its epoch count)")}


# ----------------------------------------------------------------------------- report


def _ok(flag: bool | None) -> str:
    return "n/a" if flag is None else ("**met**" if flag else "**not met**")


def batching_bounds(profile: dict[str, Any], peak: float) -> dict[str, float]:
    """What limits batching's gain over one utterance per batch: no step beats the matmul
    peak (`peak_bound`, a hard ceiling), and batching saves the fixed cost of a step
    (`fixed_share` of a one-utterance step) plus whatever per-utterance compute gets cheaper
    in larger batches (the batch-budget sweep)."""
    step, fixed = profile["one_per_batch_step_s"], profile["step_overhead_s"]
    return {"peak_bound": peak / profile["one_per_batch"]["useful_flops"],
            "fixed_share": fixed / step}


def verdicts(r: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(target, threshold, measured, met) rows of the report."""
    out: list[tuple[str, str, str, bool | None]] = []
    peak = r["matmul_peak"]["flops"]
    tr = r.get("training", {})
    if "paper" in tr:
        frac = tr["paper"]["bucketed"]["useful_flops"] / peak
        executed = tr["paper"]["bucketed"]["executed_flops"] / peak
        out.append(("Paper-profile training vs matmul peak", "≥ 50 %",
                    f"{100 * frac:.1f} % useful ({100 * executed:.1f} % executed)",
                    frac >= TARGETS["train_fraction_of_peak"]))
    for name in ("paper", "default", "plain"):
        if name in tr:
            s = tr[name]["speedup_vs_one_per_batch"]
            bounds = batching_bounds(tr[name], peak)
            out.append((f"Bucketed vs one-per-batch ({name} profile)", "≥ 5×",
                        f"{s:.2f}× (peak bound {bounds['peak_bound']:.2f}×; fixed cost "
                        f"{100 * bounds['fixed_share']:.0f} % of a one-utterance step)",
                        s >= TARGETS["bucketed_speedup"]))
    for name in ("paper", "default", "plain"):
        if name in tr:
            d = tr[name]["equality"]["max_abs_diff"]
            out.append((f"Identical per-utterance outputs ({name})", "max |Δp| ≤ 1e-5",
                        f"{d:.2e}", d <= TARGETS["equality_atol"]))
    fe = r.get("features")
    if fe:
        largest = list(fe["speedup"])[-1]
        s = fe["speedup"][largest]
        out.append((f"Feature extraction vs librosa loop (same corpus, at {largest})", "≥ 2×",
                    ", ".join(f"{k}: {v:.2f}×" for k, v in fe["speedup"].items()),
                    s >= TARGETS["feature_speedup"]))
        g = fe["memory_growth_2x"]
        out.append(("Peak memory does not grow with corpus (2× / 1×)", "≤ 1.2 (PSS)",
                    f"PSS {g['pss']:.2f}, RSS {g['rss']:.2f}, anonymous {g['anon']:.2f}",
                    g["pss"] <= TARGETS["memory_growth"]))
    dv = r.get("dvc")
    if dv:
        out.append(("No-op `dvc repro`", "seconds (no target)",
                    f"{dv['noop_repro']['wall_s']:.1f} s", None))
        out.append(("`dvc exp run -S arcface.s=3`: 0 s in data stages, only ArcFace rows",
                    "0 s; train/evaluate@arcface rows + ablate",
                    f"{dv['exp_data_stage_s']:.1f} s; ran "
                    f"{', '.join(sorted(dv['exp_run_arcface_s3']['stages_run']))}",
                    dv["exp_data_stage_s"] == 0 and dv["exp_only_expected"]))
        full = dv["full_repro"]["wall_s"]
        out.append(("Whole default `dvc repro` (2 cores, no GPU)", "≤ 15 min",
                    f"{full / 60:.1f} min" + (" (shrunk params, --quick)" if dv["shrunk"] else ""),
                    None if dv["shrunk"] else full <= TARGETS["full_repro_s"]))
    gr = r.get("growth")
    if gr:
        out.append(("Epoch time grows linearly (per-utterance cost 4× vs 1×)", "within ±20 %",
                    f"{gr['epoch_per_utt_ratio']:.2f}", gr["epoch_linear"]))
        out.append(("Feature-store size grows linearly (bytes/utterance 4× vs 1×)",
                    "within ±20 %", f"{gr['store_per_utt_ratio']:.2f}", gr["store_linear"]))
    gpu = r.get("gpu", {})
    out.append(("GPU figures", "when a GPU is present",
                "no GPU present" if not gpu.get("present") else "see GPU section", None))
    return out


def write_report(r: dict[str, Any], path: Path) -> None:
    m = r["machine"]
    peak = r["matmul_peak"]["flops"]
    lines = [
        "# Benchmark: time to the ablation table",
        "",
        f"Generated by `python -m mdser.bench{' --quick' if r['quick'] else ''}` on "
        f"{r['date']} in {r['wall_s'] / 60:.1f} min.",
        "",
        f"**Machine**: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, GPU: {m['gpu']}; "
        f"TensorFlow {m['tensorflow']}, Keras {m['keras']}, Python {m['python']}.",
        "",
        f"**Measured float32 matmul peak**: {peak / 1e9:.1f} GFLOP/s "
        f"(tf.matmul {r['matmul_peak']['n']}², best of {r['matmul_peak']['repeats']}, "
        f"the better of a measurement at the start and one at the end; start "
        f"{r.get('matmul_peak_start', r['matmul_peak'])['flops'] / 1e9:.1f}, end "
        f"{r.get('matmul_peak_end', r['matmul_peak'])['flops'] / 1e9:.1f}). Load average "
        f"(1 min) at start {r.get('load_average_start', [0])[0]:.2f}, at end "
        f"{r.get('load_average_end', [0])[0]:.2f}: other processes on the machine make "
        "every figure noisier.",
        "",
        "## Targets",
        "",
        "| Target | Threshold | Measured | Verdict |",
        "|---|---|---|---|",
    ]
    for name, thr, measured, ok in verdicts(r):
        lines.append(f"| {name} | {thr} | {measured} | {_ok(ok)} |")
    tr = r.get("training", {})
    if tr:
        lines += [
            "", "## Training throughput",
            "",
            "IEMOCAP-like synthetic lengths (log-normal, mean ≈ 4.5 s, clipped 0.6–30 s); "
            "`length_batches` + `pad_batch` and a train step built as in `fit_fold`. "
            "FLOPs are analytic (Conv2D + Dense: 2·MACs, ×3 for forward + backward); "
            "*useful* counts real frames, *executed* counts padded frames.",
            "",
            "| Profile | filters | conv | batch frames | utt/s bucketed | utt/s one-per-batch | "
            "ratio (same utts) | useful GFLOP/s | % of peak | padding | host prep | max |Δp| |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, t in tr.items():
            b = t["bucketed"]
            lines.append(
                f"| {name} | {t['model']['filters']} | {t['model']['conv']} | "
                f"{t['batch_frames']} | "
                f"{b['utt_per_s']:.2f} | {t['one_per_batch']['utt_per_s']:.2f} | "
                f"{t['speedup_vs_one_per_batch']:.2f}× | {b['useful_flops'] / 1e9:.1f} | "
                f"{100 * b['useful_flops'] / peak:.1f} % | {100 * b['padding_overhead']:.1f} % | "
                f"{100 * b['host_prep_s'] / b['wall_s']:.1f} % | "
                f"{t['equality']['max_abs_diff']:.1e} |")
        lines.append("")
        for name, t in tr.items():
            lines.append(
                f"- {name}: {t['flops']['train_flop_per_frame'] / 1e6:.1f} MFLOP per frame per "
                f"training step, {t['flops']['params']:,} parameters, first step (trace) "
                f"{t['first_step_s']:.1f} s, {t['tracings']} tracing(s); one-per-batch "
                f"{t['one_per_batch']['useful_flops'] / 1e9:.1f} GFLOP/s, "
                f"{1000 * t['one_per_batch_step_s']:.0f} ms per step; fixed cost of a step "
                f"(one 32-frame utterance) {1000 * t['step_overhead_s']:.0f} ms.")
        sw = r.get("batch_budget_sweep")
        if sw:
            lines += ["", f"Batch budget sweep (default profile, {sw['utterances']} utterances, "
                      "one traced step; budget 1 = one utterance per batch):", "",
                      "| batch_frames | mean batch size | utt/s | useful GFLOP/s | padding |",
                      "|---|---|---|---|---|"]
            for budget, v in sw["budgets"].items():
                lines.append(f"| {budget} | {v['mean_batch_size']:.1f} | {v['utt_per_s']:.2f} | "
                             f"{v['useful_flops'] / 1e9:.1f} | "
                             f"{100 * v['padding_overhead']:.1f} % |")
        tc = r.get("trace_cost")
        if tc:
            a, b = tc["first_fold"], tc["next_fold"]
            lines += ["", f"Trace cost (default profile, paid once per row by `RowTrainer`): first "
                      f"step of the first fold {a['first_step_s']:.1f} s ({a['tracings']} tracing); "
                      f"first step of the next fold {b['first_step_s']:.2f} s "
                      f"({b['tracings']} tracing in all)."]
    fe = r.get("features")
    if fe:
        lines += [
            "", "## Feature extraction",
            "",
            "Each run in a fresh process (as in a DVC stage), timed from the import of its own "
            "modules (the repository's `features` and `stores`; librosa and the submodules it "
            "loads lazily); peak memory of the process tree "
            "(PSS: shared pages split among the processes sharing them).",
            "",
            "| Corpus | utterances | audio s | resample s | featurize s | audio s / s | "
            "peak PSS MiB | peak RSS MiB | peak anon MiB | store MiB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key, v in fe["repo"].items():
            lines.append(
                f"| repo {key} | {v['utterances']} | {v['audio_s']:.0f} | {v['resample_s']:.1f} | "
                f"{v['featurize_s']:.1f} | {v['audio_s_per_s']:.1f} | {v['peak_pss_mib']:.0f} | "
                f"{v['peak_rss_mib']:.0f} | {v['peak_anon_mib']:.0f} | "
                f"{v['store_bytes'] / 2**20:.1f} |")
        for key, n in fe["librosa"].items():
            lines.append(
                f"| librosa loop {key} | {n['utterances']} | {n['audio_s']:.0f} | – | – | "
                f"{n['audio_s_per_s']:.1f} | {n['peak_pss_mib']:.0f} | {n['peak_rss_mib']:.0f} | "
                f"{n['peak_anon_mib']:.0f} | – |")
        p = fe["profile"]
        lines += ["", f"Single-process split over {p['utterances']} utterances "
                  f"({p['audio_s']:.0f} s audio): read {p['read_s']:.2f} s, resample "
                  f"{p['resample_s']:.2f} s, log-mel {p['log_mel_s']:.2f} s, `features.delta` ×2 "
                  f"{p['delta_x2_s']:.2f} s (librosa.feature.delta ×2: "
                  f"{p['librosa_delta_x2_s']:.2f} s)."]
    dv = r.get("dvc")
    if dv:
        lines += ["", "## Work avoided by DVC", "",
                  f"Fresh copy, {'shrunk params (--quick), ' if dv['shrunk'] else ''}"
                  f"{len(dv['rows'])} ablation rows.", "",
                  "| Command | wall s | stages run (s) |", "|---|---|---|"]
        for key in ("full_repro", "noop_repro", "exp_run_arcface_s3"):
            d = dv[key]
            stages = ", ".join(f"{k} {v:.1f}" for k, v in d["stages_run"].items()) or "none"
            lines.append(f"| `{d['cmd']}` | {d['wall_s']:.1f} | {stages} |")
    gr = r.get("growth")
    if gr:
        lines += ["", "## Growth", "", "| Corpus | utterances | frames | epoch s | ms/utt | "
                  "store MiB | KiB/utt |", "|---|---|---|---|---|---|---|"]
        for key, g in gr["sizes"].items():
            lines.append(
                f"| {key} | {g['utterances']} | {g['frames']} | {g['epoch_s']:.2f} | "
                f"{1000 * g['s_per_utt']:.1f} | {g['store_bytes'] / 2**20:.1f} | "
                f"{g['store_bytes'] / g['utterances'] / 1024:.1f} |")
        lines += ["", f"Per-utterance epoch cost 4×/1×: {gr['epoch_per_utt_ratio']:.2f} "
                  f"({'linear' if gr['epoch_linear'] else 'not linear'} within ±20 %); "
                  f"store bytes per utterance 4×/1×: {gr['store_per_utt_ratio']:.2f} "
                  f"({'linear' if gr['store_linear'] else 'not linear'})."]
    gpu = r.get("gpu", {})
    lines += ["", "## GPU", ""]
    if not gpu.get("present"):
        lines.append("No GPU present: GPU figures not measured.")
    else:
        for name, v in gpu["runs"].items():
            if "error" in v:
                lines.append(f"- {name}: {v['error']}")
            else:
                lines.append(f"- {name}: {v['utt_per_s']:.1f} utt/s, "
                             f"{v['useful_flops'] / 1e12:.2f} TFLOP/s useful, GPU utilization "
                             f"{v.get('gpu_utilization_pct')} %")
    pr = r.get("projection")
    if pr:
        lines += ["", "## Projected full paper-profile ablation", "",
                  f"{pr['rows']} rows × {pr['folds']} folds × {pr['epochs']} epochs, IEMOCAP "
                  f"({IEMOCAP['utterances']} utts, {IEMOCAP['mean_s']} s) + EMODB "
                  f"({EMODB['utterances']} utts, {EMODB['mean_s']} s) on {pr['device']}: "
                  f"**{pr['total_h']:.1f} h** at {pr['achieved_flops_used'] / 1e9:.1f} GFLOP/s "
                  f"({pr['assumption']})."]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- main


@contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mdser-bench-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def run_training(params: dict[str, Any], size: dict[str, Any]) -> dict[str, Any]:
    prof = profiles(params)
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


def run_features(params: dict[str, Any], size: dict[str, Any], work: Path
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    from mdser.corpora import write_manifest

    base = size["corpus_utts"] or params["data"]["synth"]["utterances"]
    repo, growth = {}, {}
    default = profiles(params)["default"]
    libr, prof, trainer = {}, None, None
    for factor in size["growth_factors"]:
        key = f"{factor}x"
        raw = work / f"corpus_{key}" / "raw"
        manifest = make_corpus(params, base * factor, raw)
        manifest_csv = work / f"corpus_{key}" / "manifest.csv"
        write_manifest(manifest, manifest_csv)
        res = in_fresh_process("_features_job", "repo", str(manifest_csv), str(raw),
                               str(work / f"corpus_{key}"))
        log(f"features {key}: {res['utterances']} utts, {res['audio_s_per_s']:.1f} audio s/s, "
            f"peak RSS {res['peak_rss_mib']:.0f} MiB")
        repo[key] = res
        if factor in size["naive_feature_factors"]:
            libr[key] = in_fresh_process("_features_job", "librosa", str(manifest_csv), str(raw), "")
            prof = prof or feature_profile(params, manifest, raw)
            log(f"librosa loop {key}: {libr[key]['audio_s_per_s']:.1f} audio s/s")
        g, trainer = growth_epoch(params, Path(res["feature_store"]), default, trainer)
        g["store_bytes"] = res["store_bytes"]
        growth[key] = g
        log(f"growth {key}: epoch {g['epoch_s']:.1f} s")
        shutil.rmtree(raw, ignore_errors=True)
    features = {
        "repo": repo, "librosa": libr, "profile": prof,
        "speedup": {k: repo[k]["audio_s_per_s"] / v["audio_s_per_s"] for k, v in libr.items()},
        "memory_growth_2x": {
            k: repo["2x"][f"peak_{k}_mib"] / repo["1x"][f"peak_{k}_mib"]
            for k in ("rss", "pss", "anon")
        },
    }
    lo, hi = growth["1x"], growth[f"{size['growth_factors'][-1]}x"]
    epoch_ratio = hi["s_per_utt"] / lo["s_per_utt"]
    store_ratio = (hi["store_bytes"] / hi["utterances"]) / (lo["store_bytes"] / lo["utterances"])
    grow = {
        "model": default, "sizes": growth, "epoch_per_utt_ratio": epoch_ratio,
        "epoch_per_frame_ratio": hi["s_per_kframe"] / lo["s_per_kframe"],
        "store_per_utt_ratio": store_ratio,
        "epoch_linear": abs(epoch_ratio - 1) <= TARGETS["linearity"],
        "store_linear": abs(store_ratio - 1) <= TARGETS["linearity"],
    }
    return features, grow


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (about 2 minutes)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["training", "features", "dvc", "gpu"], help="sections to skip")
    parser.add_argument("--ablation-epochs", type=int, default=50,
                        help="epochs per fold assumed for the projected ablation (paper: unstated)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)

    from mdser.params import load_params

    t_start = time.perf_counter()
    params = load_params(ROOT / "params.yaml")
    size = SIZES["quick" if args.quick else "full"]
    results: dict[str, Any] = {
        "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "targets": TARGETS, "sizes": size,
    }
    results["machine"] = machine_info()
    log(f"machine: {results['machine']['device']}, TF {results['machine']['tensorflow']}")
    results["matmul_peak"] = matmul_peak(size["matmul_n"], size["matmul_repeats"])
    log(f"matmul peak {results['matmul_peak']['flops'] / 1e9:.1f} GFLOP/s")
    results["load_average_start"] = os.getloadavg()
    with workdir(args.keep) as work:
        if "training" not in args.skip:
            results["training"] = run_training(params, size)
            log("batch budget sweep (default profile)")
            results["batch_budget_sweep"] = batch_budget_sweep(
                profiles(params)["default"], params, size["default_utts"],
                [1, 1000, 3000, 6000, 12000] if not args.quick else [1, 1500, 6000])
            if not args.quick:
                log("trace cost (default profile)")
                results["trace_cost"] = trace_cost(profiles(params)["default"], params)
        if "features" not in args.skip:
            results["features"], results["growth"] = run_features(params, size, work)
        if "dvc" not in args.skip:
            results["dvc"] = dvc_work(size["dvc_rows"], args.quick, work / "dvc")
    prof = profiles(params)
    if "gpu" not in args.skip:
        results["gpu"] = gpu_figures(params, prof["paper"], 16 if args.quick else 64,
                                     params["train"]["batch_frames"])
    if "training" in results:
        gpu = results.get("gpu", {})
        flops = results["training"]["paper"]["bucketed"]["useful_flops"]
        device = results["machine"]["device"]
        fp32 = gpu.get("runs", {}).get("fp32", {}) if gpu.get("present") else {}
        if "useful_flops" in fp32:
            best = max((v for v in gpu["runs"].values() if "useful_flops" in v),
                       key=lambda v: v["useful_flops"])
            flops, device = best["useful_flops"], results["machine"]["gpu"]
        results["projection"] = project_ablation(params, prof["paper"], flops,
                                                 args.ablation_epochs)
        results["projection"]["device"] = device
    end_peak = matmul_peak(size["matmul_n"], size["matmul_repeats"])
    results["matmul_peak_end"] = end_peak
    if end_peak["flops"] > results["matmul_peak"]["flops"]:  # contention: keep the better one
        results["matmul_peak_start"] = results["matmul_peak"]
        results["matmul_peak"] = end_peak
    log(f"matmul peak at the end {end_peak['flops'] / 1e9:.1f} GFLOP/s")
    results["load_average_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - t_start
    results["verdicts"] = [
        {"target": t, "threshold": thr, "measured": m, "met": ok}
        for t, thr, m, ok in verdicts(results)
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    report = args.out.with_name("report.md")
    write_report(results, report)
    log(f"wrote {args.out} and {report} in {results['wall_s'] / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
