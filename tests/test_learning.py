"""Every ablation row, built from its own parameters, can fit a small training set.

A row that cannot memorise 28 utterances in a few hundred steps has a defect (an
initialisation, a head, a learning-rate range that stalls it), not a result. Each row
trains until its training accuracy, read every 25 steps, reaches 95 %, for at most 300.
"""

import numpy as np
import pandas as pd
import pytest

from mdser.batching import length_batches, pad_batch
from mdser.params import load_params, row_model
from mdser.training import RowTrainer, class_weights

N_CLASSES, PER_CLASS, N_MELS = 7, 4, 20  # 20 bands: 10 after the first pooling, SPP(…, 10) fits
STEPS, CHECK_EVERY = 300, 25  # at most 300 steps; the training accuracy is read every 25


def small_training_set(seed: int = 0):
    """28 utterances of 32-63 frames: noise with a class-dependent spectral template."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    lengths = rng.integers(32, 64, labels.size)
    templates = rng.standard_normal((N_CLASSES, N_MELS, 3)).astype(np.float32)
    frames = rng.standard_normal((lengths.sum(), N_MELS, 3)).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for o, n, y in zip(offsets, lengths, labels, strict=True):
        frames[o : o + n] += 0.5 * templates[y]
    rows = pd.DataFrame({"offset": offsets, "frames": lengths})
    return frames, rows, labels


# the plain CNN and the full model (MDCB, SPP, attention, ArcFace) in the fast set; every other
# row only in the full suite (about 4 s each on 2 cores)
FAST_ROWS = {"cnn-gmp-softmax", "mdcnn-ff-spp-att-arcface"}


@pytest.mark.parametrize("row", [pytest.param(r, marks=() if r in FAST_ROWS else pytest.mark.slow)
                                 for r in sorted(load_params()["ablation"]["rows"])])
def test_every_row_fits_a_small_training_set(row):
    params = load_params()
    model_params = row_model(params, row)
    train = params["train"]
    frames, rows, labels = small_training_set()
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
    trainer = RowTrainer(model_params, train, params[model_params["head"]], N_CLASSES, N_MELS)
    budget = 1024
    batches = [pad_batch(frames, rows.iloc[b], mean, std) + (labels[b],)
               for b in length_batches(rows["frames"].to_numpy(), budget)]
    weights = class_weights(labels, N_CLASSES, train["class_weight_alpha"]).astype(np.float32)
    trainer.start_fold(0, len(batches))  # the row's CLR between train.lr_min and train.lr_max
    accuracies = []
    for step in range(1, STEPS + 1):
        x, lengths, y = batches[step % len(batches)]
        loss = trainer.train_step(x, lengths, y.astype(np.int32), weights[y])
        if step % CHECK_EVERY == 0:
            assert np.isfinite(float(loss)), f"{row}: training loss {float(loss)} at step {step}"
            probs = trainer.predict(frames, rows, mean, std, budget)
            accuracies.append(float(np.mean(probs.argmax(axis=1) == labels)))
            if accuracies[-1] >= 0.95:
                break
    assert accuracies[-1] >= 0.95, (
        f"{row}: training accuracy {accuracies[-1]:.2f} after {STEPS} steps "
        f"(every {CHECK_EVERY} steps: {', '.join(f'{a:.2f}' for a in accuracies)})")
