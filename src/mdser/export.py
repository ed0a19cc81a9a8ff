"""A row's trained models as one self-contained inference model (`mdser export`).

The exported model is the ensemble `mdser.predict` applies, in one graph:

    features (B, n_mels, T, 3) float32: the 3-channel log-mel of `features.three_channel`,
        *not* standardised (with `train.standardize: speaker`: speaker-normalised by
        `features.speaker_standardized` over the speaker's recordings), zero-padded along time
    lengths  (B,) int32: the true frame count of each utterance (at least 2)
    -> for each fold k: standardise with fold k's training mean and std, re-zero the
       padded frames, fold k's model, class probabilities (softmax, or softmax(s cos)
       for ArcFace)
    -> probabilities (B, n_classes): the mean over the folds

It is written under `exports/<row>/` as a TensorFlow SavedModel (`saved_model/`,
signature `serve` with inputs `features` and `lengths`), as ONNX (`model.onnx`, the
same inputs, output `probabilities`, converted by Keras 3's `model.export(format="onnx")`)
and `model.json` (row, class names, the parameters a caller needs to make the features).
Both files are checked against the Keras model on utterances of different lengths
before anything is kept. The ONNX model is logged to MLflow with its signature and an
input example and registered as `mdser-<corpus>-<row>`, alias `best` when the row is
the best of `metrics/ablation.json`, else `candidate` (MLflow reserves `latest`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from mdser.errors import UserError
from mdser.predict import RowModels

OUTPUT = "probabilities"
ALIASES = {True: "best", False: "candidate"}  # is the row the table's best? ("latest" is reserved)
MATCH_ATOL = 1e-5  # an exported file must give the Keras model's probabilities within this
PROBE_FRAMES = (37, 64, 101)  # utterance lengths the exported files are checked on


def ensemble_model(params: dict[str, Any], models: RowModels, n_mels: int) -> Any:
    """The Keras model of the module docstring: raw features and lengths -> mean probabilities."""
    import keras
    from keras import ops

    from mdser.model import build_model, class_probabilities
    from mdser.model.layers import MaskFrames

    head = models.model_params["head"]
    n_classes = len(models.classes)

    class StandardizedFold(keras.layers.Layer):
        """One fold's model behind its own standardisation (as `batching.pad_batch` does it)."""

        def __init__(self, fold: Any, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.model = build_model(models.model_params, n_classes, n_mels=n_mels)
            self.model.load_weights(fold.weights)
            self.mean, self.std = fold.mean, fold.std
            self.mask = MaskFrames()

        def call(self, features: Any, lengths: Any) -> Any:
            x = self.mask((features - self.mean) / self.std, lengths)  # padding stays zero
            return class_probabilities(head, self.model({"features": x, "lengths": lengths}), params[head])

        def compute_output_shape(self, features_shape: Any, lengths_shape: Any = None) -> tuple:
            return (features_shape[0], n_classes)

    keras.mixed_precision.set_global_policy("float32")  # ONNX export needs float32 weights
    features = keras.Input((n_mels, None, 3), name="features", dtype="float32")
    lengths = keras.Input((), name="lengths", dtype="int32")
    probs = [StandardizedFold(f, name=f"fold_{f.fold}")(features, lengths) for f in models.folds]
    mean = probs[0] if len(probs) == 1 else ops.mean(ops.stack(probs, axis=0), axis=0)
    return keras.Model({"features": features, "lengths": lengths}, mean, name=f"mdser_{models.row}")


def probe_batch(n_mels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Utterances of `PROBE_FRAMES` lengths, zero-padded into one batch (log-mel-like values)."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(PROBE_FRAMES, np.int32)
    x = np.zeros((len(lengths), n_mels, int(lengths.max()), 3), np.float32)
    for b, n in enumerate(lengths):
        x[b, :, :n] = rng.normal([-8.0, 0.0, 0.0], [3.0, 0.3, 0.1], (n_mels, n, 3))
    return x, lengths


def rename_onnx_output(path: Path, name: str) -> None:
    """Give the ONNX graph's only output a readable name (tf2onnx calls it `Identity:0`)."""
    import onnx

    model = onnx.load(str(path))
    old = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
        node.input[:] = [name if i == old else i for i in node.input]
    model.graph.output[0].name = name
    onnx.save(model, str(path))


def saved_model_outputs(path: Path, x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    serve = tf.saved_model.load(str(path)).signatures["serve"]
    return np.asarray(next(iter(serve(features=tf.constant(x), lengths=tf.constant(lengths)).values())))


def onnx_outputs(path: Path, x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT], {"features": x, "lengths": lengths})[0]


def check_export(name: str, got: np.ndarray, want: np.ndarray) -> None:
    """Refuse an exported file whose probabilities differ from the Keras model's."""
    diff = float(np.max(np.abs(got - want)))
    if not diff <= MATCH_ATOL:
        raise UserError(f"the {name} export differs from the Keras model by {diff:.3g} "
                        f"(> {MATCH_ATOL}) on utterances of {list(PROBE_FRAMES)} frames; nothing exported")


def export_row(params: dict[str, Any], models: RowModels, out: Path) -> dict[str, Any]:
    """Write `out`/saved_model, `out`/model.onnx and `out`/model.json (atomically); return model.json."""
    from mdser.stores import atomic_dir

    n_mels = params["features"]["n_mels"]
    model = ensemble_model(params, models, n_mels)
    x, lengths = probe_batch(n_mels)
    want = np.asarray(model({"features": x, "lengths": lengths}))
    info = {
        "row": models.row, "classes": models.classes, "folds": [f.fold for f in models.folds],
        "inputs": {"features": ["batch", n_mels, "frames", 3], "lengths": ["batch"]}, "output": OUTPUT,
        "sample_rate": params["audio"]["sample_rate"], "features": params["features"],
        "model": models.model_params, "standardize": params["train"]["standardize"],
    }
    with atomic_dir(out) as tmp:
        model.export(str(tmp / "saved_model"), format="tf_saved_model", verbose=False)
        with warnings.catch_warnings():  # Keras' tf2onnx patch probes the removed `np.object`
            warnings.simplefilter("ignore", FutureWarning)
            model.export(str(tmp / "model.onnx"), format="onnx", verbose=False)
        rename_onnx_output(tmp / "model.onnx", OUTPUT)
        check_export("SavedModel", saved_model_outputs(tmp / "saved_model", x, lengths), want)
        check_export("ONNX", onnx_outputs(tmp / "model.onnx", x, lengths), want)
        (tmp / "model.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API on `uri` for a while; MLFLOW_TRACKING_URI is left as it was
    (`mlflow.set_tracking_uri` writes it, and here it means "a shared server")."""
    import mlflow

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)  # None unsets the variable again


def registered_name(corpus: str, row: str) -> str:
    return f"mdser-{corpus}-{row}"


def log_export(params: dict[str, Any], out: Path, alias: str) -> tuple[str, str]:
    """Log `out`'s ONNX model to MLflow (signature, input example), its SavedModel and
    model.json as artifacts; register it and point `alias` at the new version.
    Returns (registered model name, version)."""
    import mlflow
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from mdser.tracking import client, experiment_id, store_lock, tracking_uri

    info = json.loads((out / "model.json").read_text())
    corpus, row, n_mels = params["data"]["corpus"], info["row"], params["features"]["n_mels"]
    name = registered_name(corpus, row)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_mels, -1, 3), "features"),
                       TensorSpec(np.dtype(np.int32), (-1,), "lengths")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(info["classes"])), OUTPUT)]),
    )
    x, lengths = probe_batch(n_mels)
    example = {"features": x[:1, :, : lengths[0]], "lengths": lengths[:1]}
    c = client()
    with store_lock():
        exp = experiment_id(c, f"{params['mlflow']['experiment_prefix']}-{corpus}")  # before the URI is set
    with store_lock(), fluent_tracking_uri(tracking_uri()):
        tags = {"row": row, "corpus": corpus, "level": "export"}
        with mlflow.start_run(experiment_id=exp, run_name=f"{row}/export", tags=tags):
            mlflow.log_params({"row": row, "folds": json.dumps(info["folds"]),
                               "classes": json.dumps(info["classes"])})
            logged = mlflow.onnx.log_model(
                onnx.load(str(out / "model.onnx")), name="model", signature=signature,
                input_example=example, registered_model_name=name, metadata={"classes": info["classes"]},
                onnx_execution_providers=["CPUExecutionProvider"],  # requirements.txt: onnxruntime
            )
            mlflow.log_artifacts(str(out / "saved_model"), "saved_model")
            mlflow.log_artifact(str(out / "model.json"))
        version = str(logged.registered_model_version)
        c.set_registered_model_alias(name, alias, version)
    return name, version
