"""`mdser export`: the SavedModel and the ONNX model give the Keras ensemble's probabilities,
which are `mdser predict`'s; the MLflow registered model carries its alias.

The fold models are built untrained and written as `train@<row>` writes them
(model.weights.h5 and fold.json with the training mean and std): tests/test_predict.py
covers reading real `train_row` output.
"""

import json
import os
from pathlib import Path

import helpers
import numpy as np
import pandas as pd
import pytest
import yaml

from mdser import cli
from mdser.params import load_params, row_model
from mdser.predict import fold_probabilities, load_row

ROW = "cnn-gmp-softmax"
CLASSES = ["ang", "hap", "neu", "sad"]


def tiny_params() -> dict:
    """The tiny configuration with 20 bands, validated by the schema."""
    return helpers.tiny_params({"features": {"n_mels": 20}}, validate=True)


def write_row(root: Path, params: dict, row: str, folds: tuple[int, ...] = (0, 1)) -> None:
    """models/<row>/fold_k/ with distinct weights and statistics, and data/splits.json."""
    import keras

    from mdser.model import build_model

    for k in folds:
        keras.utils.set_random_seed(k)
        model = build_model(row_model(params, row), len(CLASSES), n_mels=params["features"]["n_mels"])
        fold = root / "models" / row / f"fold_{k}"
        fold.mkdir(parents=True)
        model.save_weights(fold / "model.weights.h5")
        stats = {"fold": k, "mean": [-8.0 + k, 0.01, -0.01], "std": [3.0 + k, 0.3, 0.1]}
        (fold / "fold.json").write_text(json.dumps(stats))
    splits = root / "data" / "splits.json"
    splits.parent.mkdir(exist_ok=True)
    splits.write_text(json.dumps({"manifest_sha256": "", "classes": CLASSES, "folds": []}))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A repository root where `mdser export ROW` has run (ROW is the table's best row)."""
    root = tmp_path_factory.mktemp("repo")
    params = tiny_params()
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "metrics").mkdir()
    (root / "metrics" / "ablation.json").write_text(json.dumps(
        {"table1": {ROW: {"ua_mean": 40.0}, "ff-spp-softmax": {"ua_mean": 30.0}}}))
    write_row(root, params, ROW)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cli.main(["export", ROW])
        yield root


def test_saved_model_and_onnx_give_the_ensembles_probabilities_which_are_predicts(repo):
    from mdser.export import ensemble_model, onnx_outputs, saved_model_outputs

    out = repo / "exports" / ROW
    info = json.loads((out / "model.json").read_text())
    assert info["classes"] == CLASSES and info["folds"] == [0, 1]

    params = load_params("params.yaml")
    models = load_row(params, ROW, Path("models") / ROW, Path("data/splits.json"))
    rng = np.random.default_rng(7)
    lengths = np.array([23, 58, 97], np.int32)  # not the lengths export checked itself on
    utterances = [rng.normal([-8.0, 0.0, 0.0], [3.0, 0.3, 0.1], (n, 20, 3)).astype(np.float32)
                  for n in lengths]
    x = np.zeros((3, 20, lengths.max(), 3), np.float32)
    for b, u in enumerate(utterances):
        x[b, :, : len(u)] = u.transpose(1, 0, 2)
    keras_probs = np.asarray(ensemble_model(params, models, 20)({"features": x, "lengths": lengths}))
    np.testing.assert_allclose(saved_model_outputs(out / "saved_model", x, lengths), keras_probs, atol=1e-5)
    np.testing.assert_allclose(onnx_outputs(out / "model.onnx", x, lengths), keras_probs, atol=1e-5)
    for b, n in enumerate(lengths):  # alone, unpadded: the same as inside the padded batch
        alone = onnx_outputs(out / "model.onnx", x[b : b + 1, :, :n], lengths[b : b + 1])
        np.testing.assert_allclose(alone[0], keras_probs[b], atol=1e-5)

    rows = pd.DataFrame({"offset": np.concatenate([[0], np.cumsum(lengths)[:-1]]), "frames": lengths})
    predicted = fold_probabilities(params, models, np.concatenate(utterances), rows).mean(axis=0)
    np.testing.assert_allclose(keras_probs, predicted, atol=1e-5)


def test_export_registers_the_model_in_mlflow_under_its_alias(repo):
    from mlflow.tracking import MlflowClient

    from mdser.tracking import tracking_uri

    uri = tracking_uri()
    assert uri.startswith(f"sqlite:///{repo}")
    c = MlflowClient(uri)
    version = c.get_model_version_by_alias(f"mdser-synth-{ROW}", "best")
    assert int(version.version) == 1
    from mdser.export import ALIASES

    c.set_registered_model_alias(f"mdser-synth-{ROW}", ALIASES[False], "1")  # a name MLflow accepts
    import mlflow.models

    from mdser.export import fluent_tracking_uri

    with fluent_tracking_uri(uri):
        info = mlflow.models.get_model_info(f"models:/mdser-synth-{ROW}@best")
    assert [s.name for s in info.signature.inputs.inputs] == ["features", "lengths"]
    assert (repo / "mlruns" / "artifacts").is_dir()  # the repository's store, not ./mlruns elsewhere
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_an_existing_export_is_not_replaced_without_force(repo, capsys):
    out = repo / "exports" / ROW
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(repo)
        with pytest.raises(SystemExit) as exit_:
            cli.main(["export", ROW, "--no-mlflow"])
    assert exit_.value.code == 2
    assert f"error: exports/{ROW}: an earlier export is there; pass --force" in capsys.readouterr().err
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before


def test_an_spp_row_exports_to_onnx(repo):
    from mdser.export import (
        OUTPUT,
        check_export,
        ensemble_model,
        onnx_outputs,
        probe_batch,
        rename_onnx_output,
    )

    params = tiny_params()
    write_row(repo, params, "ff-spp-softmax", folds=(0,))
    models = load_row(params, "ff-spp-softmax", Path("models/ff-spp-softmax"), Path("data/splits.json"))
    model = ensemble_model(params, models, 20)
    x, lengths = probe_batch(20)
    want = np.asarray(model({"features": x, "lengths": lengths}))
    path = repo / "spp.onnx"
    model.export(str(path), format="onnx", verbose=False)
    rename_onnx_output(path, OUTPUT)
    check_export("ONNX", onnx_outputs(path, x, lengths), want)
