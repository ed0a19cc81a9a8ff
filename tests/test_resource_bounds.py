"""Resource bounds: 30-second utterances stay within the batch frame budget, and the heaviest
row trains on one well within a 24 GB machine."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import ROOT
from repo_runs import env_for


def test_batches_of_30_second_utterances_stay_within_the_frame_budget():
    from mdser.batching import TIME_QUANTUM, length_batches, pad_batch

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    budget = params["train"]["batch_frames"]
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(50, 3001, 300), [3001, 3001, 3000, 2999, 51]])
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    rows = pd.DataFrame({"frames": lengths, "offset": offsets})
    n_mels = params["features"]["n_mels"]
    frames = np.zeros((int(lengths.sum()), n_mels, 3), np.float32)
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
    seen = []
    for idx in length_batches(lengths, budget, rng):
        x, true = pad_batch(frames, rows.iloc[idx], mean, std)
        padded = x.shape[0] * x.shape[2]
        assert x.shape[2] % TIME_QUANTUM == 0 and x.shape[2] >= true.max()
        assert padded <= budget or len(idx) == 1, (len(idx), x.shape)
        assert x.nbytes <= max(budget, x.shape[2]) * n_mels * 3 * 4
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(len(lengths)))


PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, tensorflow as tf
    from mdser.params import load_params, row_model
    from mdser.model import build_model, per_sample_loss
    params = load_params(sys.argv[1])
    rows = params["ablation"]["rows"]
    row = max(rows, key=lambda r: (row_model(params, r)["conv"] == "mdcb",
                                   len(row_model(params, r)["spp_levels"]),
                                   bool(row_model(params, r)["attention"])))
    n_mels, budget = params["features"]["n_mels"], params["train"]["batch_frames"]
    rng = np.random.default_rng(0)
    out = {"row": row}
    for profile, filters in (("default", None), ("paper", 128)):
        model_params = row_model(params, row) | ({"filters": filters} if filters else {})
        model = build_model(model_params, 7, n_mels=n_mels)
        loss_fn = per_sample_loss(model_params["head"], params[model_params["head"]])
        # one 30 s utterance (3001 frames, padded to 3008), then a full batch of short ones
        for b, t, n in ((1, 3008, 3001), (budget // 256, 256, 250)):
            x = rng.standard_normal((b, n_mels, t, 3)).astype(np.float32)
            with tf.GradientTape() as tape:
                y = model({"features": x, "lengths": np.full(b, n, np.int32)}, training=True)
                loss = tf.reduce_mean(loss_fn(np.zeros(b, np.int32), y))
            grads = tape.gradient(loss, model.trainable_variables)
            assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)
        out[profile] = {"filters": model_params["filters"],
                        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_a_30_second_utterance_trains_well_within_24_gb(tmp_path):
    """Forward + backward of the heaviest row on a 30 s utterance and on a full batch, with
    the default filters and with the paper's 128: peak RSS of the process."""
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(ROOT / "params.yaml")],
                          env=env_for(ROOT) | {"CUDA_VISIBLE_DEVICES": ""}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for profile in ("default", "paper"):
        r = result[profile]
        print(f"30 s utterance, row {result['row']}, {r['filters']} filters: "
              f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB")
    assert result["default"]["peak_rss_bytes"] < 4 * 2**30  # a sixth of a 24 GB machine
    assert result["paper"]["peak_rss_bytes"] < 12 * 2**30  # half of it
