"""The ablation tables: the baseline row, the interval column, the paired step section,
the figure, byte-identical outputs, and the same table rebuilt from MLflow."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mdser.ablation import (
    BASELINE,
    convergence_frame,
    headline_comparisons,
    markdown,
    plot_frame,
    proposed_row,
    step_comparisons,
    steps_frame,
    table_frame,
    write_figure,
    write_tables,
)
from mdser.evaluation import summarize
from mdser.params import load_params, row_model
from mdser.statistics import paired_comparison, t_interval

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["anger", "neutral", "sadness"]
SPEAKERS = ["s0", "s1", "s2"]
PARAMS = load_params(ROOT / "params.yaml")


def fake_predictions(seed: int, accuracy: float, folds: int = 3) -> pd.DataFrame:
    """Test predictions of `folds` folds (one speaker each) right about `accuracy` of the time."""
    rng = np.random.default_rng(seed)
    parts = []
    for k in range(folds):
        actual = np.array(CLASSES * 6)
        wrong = rng.random(len(actual)) > accuracy
        predicted = np.where(wrong, rng.choice(CLASSES, len(actual)), actual)
        probs = rng.dirichlet(np.ones(3), len(actual)).round(6)
        part = pd.DataFrame({"fold": k, "utt_id": [f"{SPEAKERS[k]}_{i}" for i in range(len(actual))],
                             "speaker": SPEAKERS[k], "actual": actual, "predicted": predicted})
        for c, column in zip(CLASSES, probs.T, strict=True):
            part[f"p_{c}"] = column
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def fake_summaries(rows: list[str], folds: int = 3) -> dict[str, dict]:
    out = {}
    for i, row in enumerate([BASELINE, *rows]):
        s = summarize(fake_predictions(i, 0.3 + 0.05 * i, folds), CLASSES)
        out[row] = json.loads(json.dumps(s)) | {"n_folds": len(s["folds"])}  # as read from summary.json
    return out


@pytest.fixture(scope="module")
def tables():
    rows = sorted(PARAMS["ablation"]["rows"])
    summaries = fake_summaries(rows)
    models = {row: row_model(PARAMS, row) for row in rows}
    frame = table_frame(PARAMS, models, summaries, "synth")
    steps = step_comparisons(PARAMS, summaries)
    return summaries, frame, steps


def test_the_baseline_row_opens_both_tables(tables):
    _, frame, _ = tables
    for table in ("table1", "table3"):
        part = frame[frame["table"] == table]
        assert part["row"].iloc[0] == BASELINE and (part["row"] == BASELINE).sum() == 1
        assert part["row"].iloc[1:].tolist() == [r for r in PARAMS["tables"][table]]
    base = frame[frame["row"] == BASELINE].iloc[0]
    assert base["cnn"].startswith("Logistic regression") and pd.isna(base["paper_ua"])


def test_the_interval_column_is_the_t_interval_of_the_fold_uas(tables):
    summaries, frame, _ = tables
    for r in frame.itertuples():
        lo, hi = t_interval([f["ua"] for f in summaries[r.row]["folds"]], PARAMS["ablation"]["confidence"])
        assert (r.ua_ci_low, r.ua_ci_high) == (round(100 * lo, 2), round(100 * hi, 2))
        assert r.ua_ci_low <= r.ua_mean <= r.ua_ci_high


def test_every_step_is_a_paired_comparison_of_its_two_rows(tables):
    summaries, _, steps = tables
    assert list(steps) == list(PARAMS["ablation"]["steps"])
    assert steps["cnn-gmp-softmax"]["base"] == BASELINE
    for row, s in steps.items():
        ua = {r: [f["ua"] for f in summaries[r]["folds"]] for r in (row, s["base"])}
        expected = paired_comparison(ua[row], ua[s["base"]], PARAMS["ablation"]["confidence"])
        assert {k: v for k, v in s.items() if k != "base"} == expected


def test_headline_compares_the_best_row_and_the_proposed_row_on_the_same_folds(tables):
    summaries, _, _ = tables
    models = {row: row_model(PARAMS, row) for row in PARAMS["ablation"]["rows"]}
    proposed = proposed_row(models)
    assert proposed == "mdcnn-ff-spp-att-arcface"
    best = max(sorted(r for r in summaries if r != BASELINE), key=lambda r: summaries[r]["ua_mean"])
    assert proposed != best
    headline = headline_comparisons(PARAMS, models, summaries)
    assert {k: (h["row"], h["base"]) for k, h in headline.items()} == {
        "best CNN row vs baseline": (best, BASELINE), "proposed row vs baseline": (proposed, BASELINE),
        "proposed row vs best CNN row": (proposed, best)}
    for h in headline.values():
        ua = {r: [f["ua"] for f in summaries[r]["folds"]] for r in (h["row"], h["base"])}
        expected = paired_comparison(ua[h["row"]], ua[h["base"]], PARAMS["ablation"]["confidence"])
        assert {k: v for k, v in h.items() if k not in ("row", "base")} == expected
    # the proposed row as the best row: one comparison
    as_best = summaries | {proposed: summaries[proposed] | {"ua_mean": 1.0}}
    assert list(headline_comparisons(PARAMS, models, as_best)) == ["best CNN row vs baseline"]


def test_markdown_has_the_ci_column_and_the_steps_section(tables):
    _, frame, steps = tables
    md = markdown(frame, "synth", steps_frame(steps), 0.95)
    sections = md.split("\n## ")
    assert [s.split("\n")[0] for s in sections[1:]] == [
        "Table 1: CNN section, pooling and loss", "Table 3: SPP schemes on the CNN with FF",
        "Ablation steps: paired comparisons"]
    for table in sections[1:3]:
        assert "| UA | 95 % CI | paper UA |" in table and "\n| baseline | Logistic regression" in table
    lines = [line for line in sections[3].splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[0][2:] for line in lines] == list(PARAMS["ablation"]["steps"])
    first = steps_frame(steps).iloc[0]
    assert lines[0].startswith(
        f"| cnn-gmp-softmax | baseline | 3 | {first.delta_ua:.2f} | "
        f"[{first.delta_ci_low:.2f}, {first.delta_ci_high:.2f}] | {first.p:.4g} | {first.p_min:.4g} | ")
    for line in lines:
        assert line.endswith("| yes |") or line.endswith("| not significant |")


def test_one_fold_gives_no_interval_and_no_verdict():
    rows = ["cnn-gmp-softmax"]
    summaries = fake_summaries(rows, folds=1)
    frame = table_frame(PARAMS, {r: row_model(PARAMS, r) for r in rows}, summaries, "synth")
    assert frame["ua_ci_low"].isna().all()
    steps = steps_frame(step_comparisons(PARAMS, summaries))
    md = markdown(frame, "synth", steps, 0.95)
    table_lines = [line for line in md.splitlines() if line.startswith("| baseline |")]
    assert len(table_lines) == 2 and all(" ± 0.00 | - | " in line for line in table_lines)
    step_line = md.rstrip().splitlines()[-1]
    assert step_line.startswith("| cnn-gmp-softmax | baseline | 1 | ")
    assert step_line.endswith(" | - | 1 | 1 | - |")


def test_written_tables_are_byte_identical_and_the_json_stays_nested_and_numeric(tables, tmp_path):
    _, frame, steps = tables
    outputs = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        write_tables(frame, "synth", tmp_path / run / "ablation", steps_frame(steps), 0.95)
        outputs.append({s: (tmp_path / run / f"ablation.{s}").read_bytes() for s in ("md", "csv", "json")})
    assert outputs[0] == outputs[1]
    doc = json.loads(outputs[0]["json"])
    assert set(doc) == {"table1", "table3", "steps"}
    for table in ("table1", "table3"):
        for values in doc[table].values():
            assert all(isinstance(values[k], float | int)
                       for k in ("ua_mean", "ua_std", "wa_mean", "macro_f1"))
        assert isinstance(doc[table][BASELINE]["ua_ci_low"], float)
    step = doc["steps"]["ff-gmp-softmax"]
    assert step["base"] == "cnn-gmp-softmax" and isinstance(step["delta_ua"], float)
    assert isinstance(step["p"], float) and isinstance(step["significant"], bool)
    csv = pd.read_csv(tmp_path / "a" / "ablation.csv")
    assert (csv["table"] == "steps").sum() == len(steps)


def test_figure_and_its_plot_data_are_deterministic(tables, tmp_path):
    _, frame, _ = tables
    plot = plot_frame(frame)
    assert plot["row"].iloc[0] == BASELINE and plot["row"].is_unique
    assert set(plot["row"]) == set(frame["row"])
    # a row of both tables keeps the figure of the first one that has one (Table 1, EMODB here)
    ff = plot[plot["row"] == "ff-gmp-softmax"].iloc[0]
    assert (ff["paper_ua"], ff["paper_corpus"]) == (62.7, "emodb")
    files = []
    for run in ("a", "b"):
        png, csv = tmp_path / f"{run}.png", tmp_path / f"{run}.csv"
        write_figure(plot, "synth", 0.95, png, csv)
        files.append((png.read_bytes(), csv.read_bytes()))
    assert files[0] == files[1] and files[0][0][:8] == b"\x89PNG\r\n\x1a\n"
    assert files[0][1].decode().splitlines()[0] == "row,ua,ci_low,ci_high,paper_ua,paper_corpus"


# --- the stage and MLflow, end to end --------------------------------------------------------

ROWS = ["cnn-gmp-softmax", "ff-gmp-softmax", "ff-spp-softmax"]


def run_in_process(monkeypatch, cwd: Path, script: Path, *args: str) -> None:
    module = runpy.run_path(str(script), run_name="stage")
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(sys, "argv", [script.name, *args])
    module["main"]()


def write_results(folder: Path, row: str, predictions: pd.DataFrame) -> None:
    """A results folder as `evaluate` (or `baseline`, without history.csv) writes it."""
    summary = summarize(predictions, CLASSES)
    folder.mkdir(parents=True, exist_ok=True)
    predictions.to_csv(folder / "predictions.csv", index=False, lineterminator="\n")
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if row != BASELINE:
        pd.DataFrame({"fold": np.repeat(range(3), 2), "epoch": [1, 2] * 3, "val_ua": [0.2, 0.3] * 3}).to_csv(
            folder / "history.csv", index=False, lineterminator="\n")
    run = {"stage": f"evaluate@{row}", "inputs_hash": "0" * 16, "params": {"data": {"corpus": "synth"}},
           "fold_params": {str(k): {"best_epoch": "2"} for k in range(3)}, "environment": {"device": "CPU"}}
    (folder / "run.json").write_text(json.dumps(run))


def test_ablate_stage_is_deterministic_logs_each_result_once_and_mlflow_rebuilds_its_table(
    tmp_path, monkeypatch,
):
    from mdser import tracking

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ablation"]["rows"] = {r: params["ablation"]["rows"][r] for r in ROWS}
    params["ablation"]["steps"] = {r: params["ablation"]["steps"][r] for r in ROWS}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    experiment = f"{params['mlflow']['experiment_prefix']}-{params['data']['corpus']}"
    for i, row in enumerate([BASELINE, *ROWS]):
        write_results(tmp_path / "results" / row, row, fake_predictions(i, 0.3 + 0.1 * i))

    produced = ["ablation.md", "ablation.csv", "ablation.json", "ablation_plot.csv", "images/ablation.png",
                "images/baseline.png", "confusion/baseline.csv"]
    runs = []
    for _ in range(2):
        run_in_process(monkeypatch, tmp_path, ROOT / "stages" / "ablate.py", "results", "metrics")
        runs.append({p: (tmp_path / "metrics" / p).read_bytes() for p in produced})
    assert runs[0] == runs[1]
    md = runs[0]["ablation.md"].decode()
    assert md.count("\n| baseline |") == 2 and "## Ablation steps: paired comparisons" in md
    headline = md.split("## Headline: the best CNN row and the proposed row\n")[1]
    lines = [line for line in headline.splitlines() if line.startswith("| ") and "---" not in line]
    written = {r: json.loads((tmp_path / "results" / r / "summary.json").read_text()) for r in ROWS}
    best = max(ROWS, key=lambda r: written[r]["ua_mean"])  # no proposed row among ROWS
    assert [line.split(" | ")[:3] for line in lines[1:]] == [["| best CNN row vs baseline", best, "baseline"]]
    assert not (tmp_path / "metrics" / "curves" / "baseline.csv").exists()

    c = tracking.client()
    parents = tracking.latest_parent_runs(c, experiment, [BASELINE, *ROWS])
    assert {row: len(found) for row, found in parents.items()} == dict.fromkeys([BASELINE, *ROWS], 1)
    steps = json.loads(runs[0]["ablation.json"])["steps"]
    for row in ROWS:
        run = parents[row][0]
        assert run.data.tags["step_base"] == params["ablation"]["steps"][row]
        assert round(100 * run.data.metrics["step_delta_ua"], 2) == steps[row]["delta_ua"]
        assert round(run.data.metrics["step_p"], 4) == steps[row]["p"]
        assert {"step_ci_low", "step_ci_high", "step_p_min", "step_folds"} <= set(run.data.metrics)
        assert run.data.metrics["ua_ci_low"] == written[row]["ua_ci_low"]
        assert run.data.tags["dvc.stage"] == f"evaluate@{row}" and run.data.tags["device"] == "CPU"
        children = c.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        assert sorted(r.data.tags["fold"] for r in children) == ["0", "1", "2"]
        assert all(r.data.params["best_epoch"] == "2" and r.data.metrics["val_ua"] == 0.3 for r in children)
    for row in [BASELINE, *ROWS]:  # with the confusion image ablate drew
        run = parents[row][0]
        assert "confusion.png" in [a.path for a in c.list_artifacts(run.info.run_id)]

    run_in_process(monkeypatch, tmp_path, ROOT / "src" / "mdser" / "table_from_mlflow.py",
                   "metrics/from_mlflow")
    for suffix in ("md", "csv", "json"):
        assert (tmp_path / f"metrics/from_mlflow.{suffix}").read_bytes() == runs[0][f"ablation.{suffix}"]

    # one row's results change: the next ablate logs that row again, and only that row
    write_results(tmp_path / "results" / "ff-spp-softmax", "ff-spp-softmax", fake_predictions(99, 0.9))
    run_in_process(monkeypatch, tmp_path, ROOT / "stages" / "ablate.py", "results", "metrics")
    again = tracking.latest_parent_runs(c, experiment, [BASELINE, *ROWS])
    assert {row: len(found) for row, found in again.items()} == dict.fromkeys([BASELINE, *ROWS], 1) | {
        "ff-spp-softmax": 2}
    newest = again["ff-spp-softmax"][0]
    assert newest.data.metrics["ua_mean"] == json.loads(
        (tmp_path / "results" / "ff-spp-softmax" / "summary.json").read_text())["ua_mean"]
    assert "step_delta_ua" in newest.data.metrics


def test_convergence_frame_reads_each_fold_curve():
    """Fold 0 stopped early at epoch 4 (best 2); fold 1 ran to the cap, best at its last epoch."""
    history = pd.DataFrame({
        "fold": [0] * 4 + [1] * 5, "epoch": [1, 2, 3, 4, 1, 2, 3, 4, 5],
        "val_ua": [0.2, 0.6, 0.4, 0.5, 0.1, 0.2, 0.3, 0.4, 0.5],
    })
    line = convergence_frame({"r": history}, max_epochs=5, tail=2).iloc[0]
    assert (line["epochs_min"], line["epochs_max"], line["stopped_early"]) == (4, 5, 1)
    assert line["best_epoch_mean"] == pytest.approx((2 + 5) / 2)
    assert line["best_val_ua"] == pytest.approx(100 * (0.6 + 0.5) / 2)
    assert line["last_val_ua"] == pytest.approx(100 * ((0.4 + 0.5) / 2 + (0.4 + 0.5) / 2) / 2)
