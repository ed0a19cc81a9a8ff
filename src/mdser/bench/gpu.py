"""GPU figures and the projected wall time of the full paper-profile ablation.

`gpu_figures` trains the paper profile with and without mixed precision and XLA (GPU
only, with `nvidia-smi` utilization); `project_ablation` turns a measured FLOP/s into the
wall time of 10 rows x 10 folds on IEMOCAP and EMODB sizes; `projection` picks that FLOP/s
(the best GPU run, else the paper profile's CPU figure).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mdser.bench.data import EMODB, FRAMES_PER_S, IEMOCAP, no_standardization, synthetic_set
from mdser.bench.flops import model_flops
from mdser.bench.machine import GpuUtilization
from mdser.bench.training import Trainer


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
    n_mels, n_classes = params["features"]["n_mels"], IEMOCAP["classes"]
    lengths, frames, rows, labels = synthetic_set(n_utts, n_mels, n_classes)
    weights = class_weights(labels, n_classes).astype(np.float32)
    mean, std = no_standardization()
    groups = length_batches(lengths, batch_frames, np.random.default_rng(1))
    for mixed in (False, True):
        for xla in (False, True):
            name = f"{'mixed' if mixed else 'fp32'}{'+xla' if xla else ''}"
            train = params["train"] | {"mixed_precision": mixed, "xla": xla}
            try:
                trainer = Trainer(paper, train, params[paper["head"]], n_classes, n_mels)
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


def projection(results: dict[str, Any], params: dict[str, Any], paper: dict[str, Any],
               epochs: int) -> dict[str, Any]:
    """`project_ablation` at the best GPU run's useful FLOP/s when there is one, else at the
    paper profile's bucketed CPU figure; with the device it assumes."""
    gpu = results.get("gpu", {})
    flops = results["training"]["paper"]["bucketed"]["useful_flops"]
    device = results["machine"]["device"]
    fp32 = gpu.get("runs", {}).get("fp32", {}) if gpu.get("present") else {}
    if "useful_flops" in fp32:
        best = max((v for v in gpu["runs"].values() if "useful_flops" in v),
                   key=lambda v: v["useful_flops"])
        flops, device = best["useful_flops"], results["machine"]["gpu"]
    return project_ablation(params, paper, flops, epochs) | {"device": device}
