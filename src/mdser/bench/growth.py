"""Growth with corpus size: one training epoch over a real feature store, and linearity.

`growth_epoch` times an epoch (bucketed, default batch budget) over the store the feature
job wrote at 1x, 2x, 4x the built-in corpus; `growth_summary` compares the largest with 1x
(per-utterance epoch cost and store bytes, linear within `TARGETS["linearity"]`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mdser.bench.report import TARGETS
from mdser.bench.training import Trainer


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
    weights = class_weights(labels, len(classes), train["class_weight_alpha"]).astype(np.float32)
    mean, std = standardization(frames, index)
    groups = length_batches(index["frames"].to_numpy(), train["batch_frames"],
                            np.random.default_rng(0))
    if trainer is None:
        trainer = Trainer(model_params, train, params[model_params["head"]], len(classes), frames.shape[1])
        trainer.run(frames, index, labels, weights, groups[:1], mean, std)  # trace
    # best of two epochs: the first one also pays for padded shapes not seen before
    epoch = min((trainer.run(frames, index, labels, weights, groups, mean, std) for _ in range(2)),
                key=lambda e: e["wall_s"])
    return {"utterances": len(index), "frames": int(index["frames"].sum()),
            "epoch_s": epoch["wall_s"], "s_per_utt": epoch["wall_s"] / len(index),
            "s_per_kframe": 1000 * epoch["wall_s"] / int(index["frames"].sum()),
            "batches": epoch["batches"], "host_prep_s": epoch["host_prep_s"]}, trainer


def growth_summary(model_params: dict[str, Any], sizes: dict[str, dict[str, Any]],
                   largest: str) -> dict[str, Any]:
    """The growth section: per-size epochs and the `largest` / 1x ratios."""
    lo, hi = sizes["1x"], sizes[largest]
    epoch_ratio = hi["s_per_utt"] / lo["s_per_utt"]
    store_ratio = (hi["store_bytes"] / hi["utterances"]) / (lo["store_bytes"] / lo["utterances"])
    return {
        "model": model_params, "sizes": sizes, "epoch_per_utt_ratio": epoch_ratio,
        "epoch_per_frame_ratio": hi["s_per_kframe"] / lo["s_per_kframe"],
        "store_per_utt_ratio": store_ratio,
        "epoch_linear": abs(epoch_ratio - 1) <= TARGETS["linearity"],
        "store_linear": abs(store_ratio - 1) <= TARGETS["linearity"],
    }
