"""Benchmark: time to the ablation table, against the naive way and the machine's limit.

    python -m mdser.bench [--quick] [--out bench/results.json] [--skip-dvc]

One run measures, side by side on the same machine:

1. the float32 matmul peak (tf.matmul, large square matrices, best of several);
2. training throughput (utterances/s, FLOP/s) of the paper profile and the default
   profiles on IEMOCAP-like lengths, length-bucketed (``length_batches`` + ``pad_batch``)
   against one utterance per batch, and the masked equality of their outputs; fold-epoch
   throughput, FLOP/s and CPU utilisation of folds trained in parallel against the
   reference step (one fold at a time on all cores); the share of the default profile's
   step spent in oneDNN's convolution kernels, and their FLOP/s against one core's peak;
3. feature extraction (``build_audio_store`` + ``build_feature_store``) against a plain
   per-file librosa loop, with peak memory (RSS incl. children) at 1x and 2x the corpus;
4. the work DVC avoids (full / no-op ``dvc repro``, ``dvc exp run -S arcface.s=3``), the
   time of each stage and the fixed cost of each stage script;
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
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mdser.bench import ROOT, log
from mdser.bench.data import make_corpus
from mdser.bench.features import feature_profile, in_fresh_process
from mdser.bench.folds import fold_throughput
from mdser.bench.gpu import gpu_figures, projection
from mdser.bench.growth import growth_epoch, growth_summary
from mdser.bench.kernels import kernel_profile
from mdser.bench.machine import machine_info, matmul_peak
from mdser.bench.pipeline import dvc_work
from mdser.bench.report import TARGETS, verdicts, write_report
from mdser.bench.training import profiles, run_training, sweep_in_fold_process, trace_cost

SIZES = {
    "quick": {
        "matmul_n": 2048, "matmul_repeats": 3,
        "default_utts": 48, "default_naive_utts": 48,
        "paper_utts": 6, "paper_naive_utts": 3, "paper_batch_frames": 1500,
        "equality_utts": 8, "paper_equality_utts": 3,
        "corpus_utts": 40, "growth_factors": [1, 2, 4], "naive_feature_factors": [1, 4],
        "fold_utts": 32, "folds": 2, "fold_epochs": 2, "fold_rounds": 1,
        "dvc_rows": ["cnn-gmp-softmax", "mdcnn-ff-spp-att-arcface"],
    },
    "full": {
        "matmul_n": 4096, "matmul_repeats": 5,
        "default_utts": 160, "default_naive_utts": 160,
        "paper_utts": 24, "paper_naive_utts": 8, "paper_batch_frames": None,
        "equality_utts": 24, "paper_equality_utts": 4,
        "corpus_utts": None, "growth_factors": [1, 2, 4], "naive_feature_factors": [1, 4],
        "fold_utts": 96, "folds": 4, "fold_epochs": 5, "fold_rounds": 3,
        "dvc_rows": None,
    },
}


@contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mdser-bench-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def run_features(params: dict[str, Any], default: dict[str, Any], size: dict[str, Any],
                 work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Feature extraction and growth at each corpus size: (features section, growth section).

    Per size: the built-in corpus, the repository's job (and the librosa loop at some sizes)
    each in a fresh process, then one epoch of the `default` profile over the store it wrote.
    """
    from mdser.corpora import write_manifest

    base = size["corpus_utts"] or params["data"]["synth"]["utterances"]
    repo, growth = {}, {}
    libr, prof, trainer = {}, None, None
    for factor in size["growth_factors"]:
        key = f"{factor}x"
        raw = work / f"corpus_{key}" / "raw"
        manifest = make_corpus(params, base * factor, raw)
        manifest_csv = work / f"corpus_{key}" / "manifest.csv"
        write_manifest(manifest, manifest_csv)
        res = in_fresh_process("repo", manifest_csv, raw, work / f"corpus_{key}")
        log(f"features {key}: {res['utterances']} utts, {res['audio_s_per_s']:.1f} audio s/s, "
            f"peak RSS {res['peak_rss_mib']:.0f} MiB")
        repo[key] = res
        if factor in size["naive_feature_factors"]:
            libr[key] = in_fresh_process("librosa", manifest_csv, raw)
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
    return features, growth_summary(default, growth, f"{size['growth_factors'][-1]}x")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m mdser.bench", description=__doc__,
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
    prof = profiles(params)
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
            results["training"] = run_training(params, prof, size)
            log("batch budget sweep (default profile)")
            results["batch_budget_sweep"] = sweep_in_fold_process(
                size["default_utts"], [1, 1000, 3000, 6000, 12000] if not args.quick else [1, 1500, 6000])
            log(f"fold-epoch throughput (default profile), three ways, {size['fold_rounds']} round(s)")
            results["folds"] = fold_throughput(size["fold_utts"], size["folds"], size["fold_epochs"],
                                               params["runtime"]["workers"], size["fold_rounds"])
            log("convolution kernels' share of the default profile's step (oneDNN's log)")
            results["kernels"] = kernel_profile(size["fold_utts"])
            if not args.quick:
                log("trace cost (default profile)")
                results["trace_cost"] = trace_cost(prof["default"], params)
        if "features" not in args.skip:
            results["features"], results["growth"] = run_features(params, prof["default"], size,
                                                                  work)
        if "dvc" not in args.skip:
            results["dvc"] = dvc_work(size["dvc_rows"], args.quick, work / "dvc")
    if "gpu" not in args.skip:
        results["gpu"] = gpu_figures(params, prof["paper"], 16 if args.quick else 64,
                                     params["train"]["batch_frames"])
    if "training" in results:
        results["projection"] = projection(results, params, prof["paper"], args.ablation_epochs)
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
