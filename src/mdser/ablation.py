"""The paper's ablation tables (Table 1 and Table 3), built from per-row summaries.

The same function builds the table from DVC's per-row results and from MLflow's
parent runs, so the two can be compared byte for byte. Each table starts with the
baseline row (`mdser.baseline`) and gives every row the confidence interval of its
mean UA over folds; a third section compares each ablation step (`ablation.steps`:
a row against the row it modifies) fold by fold (`mdser.statistics`). The ablation
figure shows the same intervals.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from mdser.errors import UserError
from mdser.statistics import paired_comparison, t_interval

BASELINE = "baseline"  # the baseline row's name (= mdser.baseline.ROW; no sklearn import here)
BASELINE_LINE = {
    "cnn": "Logistic regression (no CNN)", "pooling": "mean, std over time", "loss": "Cross-entropy",
}
JSON_COLUMNS = ("ua_mean", "ua_std", "ua_ci_low", "ua_ci_high", "wa_mean", "macro_f1", "paper_ua")
STEP_COLUMNS = ("base", "folds", "delta_ua", "delta_ci_low", "delta_ci_high", "p", "p_min", "significant")
PLOT_COLUMNS = ("row", "ua", "ci_low", "ci_high", "paper_ua", "paper_corpus")
CONV_NAMES = {
    "plain": "Traditional CNN", "ff": "CNN with FF",
    "dilated": "Dilated CNN (rate 2) with FF", "mdcb": "Multi-dilated CNN with FF",
}


def pooling_name(model: dict[str, Any]) -> str:
    if model["pooling"] == "gmp":
        pooled = "GMP"
    else:
        pooled = "SPP(" + ",".join(str(n) for n in model["spp_levels"]) + ")"
    return pooled + (" + Attention" if model["attention"] else "")


def reference_corpus(corpus: str, table: str) -> str:
    """Whose published figure stands beside ours: the built-in corpus mimics EMODB."""
    if table == "table3":
        return "iemocap"
    return corpus if corpus in ("emodb", "iemocap") else "emodb"


def fold_uas(summary: dict[str, Any]) -> list[float]:
    """The test UA of each fold of a row's summary, in fold order."""
    return [float(f["ua"]) for f in sorted(summary["folds"], key=lambda f: f["fold"])]


def _pct(v: float | None) -> float | None:
    return None if v is None else round(100 * v, 2)


def _line(table: str, row: str, s: dict[str, Any], described: dict[str, str], ref: str,
          figure: float | None, confidence: float) -> dict[str, Any]:
    ua = round(100 * s["ua_mean"], 2)
    interval = t_interval(fold_uas(s), confidence)
    return {
        "table": table, "row": row, **described,
        "folds": int(s["n_folds"]),
        "ua_mean": ua, "ua_std": round(100 * s["ua_std"], 2),
        "ua_ci_low": None if interval is None else _pct(interval[0]),
        "ua_ci_high": None if interval is None else _pct(interval[1]),
        "wa_mean": round(100 * s["wa_mean"], 2),
        "macro_f1": round(100 * s["macro_f1_mean"], 2),
        "pooled_ua": round(100 * s["pooled_ua"], 2),
        "paper_corpus": ref, "paper_ua": figure,
        "diff": None if figure is None else round(ua - figure, 2),
    }


def table_frame(
    params: dict[str, Any], models: dict[str, dict[str, Any]],
    summaries: dict[str, dict[str, Any]], corpus: str,
) -> pd.DataFrame:
    """One line per (table, row) that was run: ours beside the paper's figure.

    Each table starts with the baseline row when `summaries` has one. `ua_ci_low`
    and `ua_ci_high` are the `ablation.confidence` Student-t interval of the mean
    fold UA (None with fewer than 2 folds). Every summary needs its `folds` (each
    with `fold` and `ua`) besides the aggregate metrics.
    """
    confidence = params["ablation"]["confidence"]
    lines = []
    for table in ("table1", "table3"):
        ref = reference_corpus(corpus, table)
        if BASELINE in summaries:
            lines.append(_line(table, BASELINE, summaries[BASELINE], BASELINE_LINE, ref, None, confidence))
        for row, paper in params["tables"][table].items():
            if row not in summaries:
                continue
            m = models[row]
            described = {"cnn": CONV_NAMES[m["conv"]], "pooling": pooling_name(m),
                         "loss": "ArcFace" if m["head"] == "arcface" else "Softmax"}
            lines.append(_line(table, row, summaries[row], described, ref, paper.get(ref), confidence))
    return pd.DataFrame(lines)


def paired_fold_uas(row: dict[str, Any], base: dict[str, Any]) -> tuple[list[int], list[float], list[float]]:
    """The folds both summaries were tested on and each one's UA there, in fold order.

    The same fold must have the same test speaker in both (otherwise the rows were
    not evaluated on the same split and cannot be paired).
    """
    a = {f["fold"]: f for f in row["folds"]}
    b = {f["fold"]: f for f in base["folds"]}
    folds = sorted(set(a) & set(b))
    for k in folds:
        if a[k].get("test_speaker") != b[k].get("test_speaker"):
            raise UserError(f"fold {k} tests speaker {a[k].get('test_speaker')!r} in one row and "
                            f"{b[k].get('test_speaker')!r} in the other; re-run `dvc repro`")
    return folds, [float(a[k]["ua"]) for k in folds], [float(b[k]["ua"]) for k in folds]


def compare_rows(summaries: dict[str, dict[str, Any]], row: str, base: str, confidence: float,
                 ) -> dict[str, Any]:
    """`paired_comparison` of two rows' fold UAs on their shared test folds, plus `base`."""
    folds, a, b = paired_fold_uas(summaries[row], summaries[base])
    if not folds:
        raise UserError(f"ablation step {row} vs {base}: the two rows share no test fold")
    return {"base": base} | paired_comparison(a, b, confidence)


def step_comparisons(
    params: dict[str, Any], summaries: dict[str, dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Each ablation step whose two rows were run: `paired_comparison` of their fold
    UAs (fractions, not %), plus `base`; in `ablation.steps` order."""
    confidence = params["ablation"]["confidence"]
    return {row: compare_rows(summaries, row, base, confidence)
            for row, base in params["ablation"]["steps"].items()
            if row in summaries and base in summaries}


def proposed_row(models: dict[str, dict[str, Any]]) -> str | None:
    """The row that is the paper's proposed model (Fig. 2): multi-dilated blocks, SPP,
    attention and the ArcFace head; the first such row by name, None without one."""
    full = {"conv": "mdcb", "pooling": "spp", "attention": True, "head": "arcface"}
    return next((r for r in sorted(models) if all(models[r][k] == v for k, v in full.items())), None)


def headline_comparisons(
    params: dict[str, Any], models: dict[str, dict[str, Any]], summaries: dict[str, dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """What the tables are read for, as paired comparisons on the same test speakers: the
    best CNN row (highest mean UA; the first by name on a tie) against the baseline, and
    the paper's proposed row (`proposed_row`, when it was run and is not the best) against
    the baseline and against the best CNN row. Keyed by what is compared; each value is
    `step_comparisons`' entry ({base} | `paired_comparison`) plus its `row`."""
    cnn = [r for r in sorted(summaries) if r != BASELINE]
    if BASELINE not in summaries or not cnn:
        return {}
    best = max(cnn, key=lambda r: summaries[r]["ua_mean"])
    pairs = {"best CNN row vs baseline": (best, BASELINE)}
    proposed = proposed_row({r: m for r, m in models.items() if r in summaries})
    if proposed is not None and proposed != best:
        pairs |= {"proposed row vs baseline": (proposed, BASELINE),
                  "proposed row vs best CNN row": (proposed, best)}
    confidence = params["ablation"]["confidence"]
    return {label: {"row": row} | compare_rows(summaries, row, base, confidence)
            for label, (row, base) in pairs.items()}


def headline_frame(headline: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """`headline_comparisons` as table lines: `steps_frame`'s columns, led by the comparison."""
    frame = steps_frame(headline).rename(columns={"row": "comparison"})
    frame.insert(1, "row", [h["row"] for h in headline.values()])
    return frame


def steps_frame(steps: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """The step comparisons as table lines: differences in UA points (2 decimals), p to 4."""
    lines = [{
        "row": row, "base": s["base"], "folds": s["n"], "delta_ua": _pct(s["delta"]),
        "delta_ci_low": _pct(s["ci_low"]), "delta_ci_high": _pct(s["ci_high"]),
        "p": round(s["p"], 4), "p_min": round(s["p_min"], 4), "significant": s["significant"],
    } for row, s in steps.items()]
    return pd.DataFrame(lines, columns=["row", *STEP_COLUMNS])


def _cell(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and pd.isna(v)) else f"{v:.2f}"


def _interval(lo: Any, hi: Any) -> str:
    return "-" if _cell(lo) == "-" else f"[{lo:.2f}, {hi:.2f}]"


def _significance(v: Any) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return "-"
    return "yes" if v else "not significant"


def _percent(confidence: float) -> str:
    return f"{100 * confidence:g} %"


def _comparison_lines(comparisons: pd.DataFrame, ci: str) -> list[str]:
    """A markdown table of `steps_frame` or `headline_frame` lines."""
    lead = ["comparison"] if "comparison" in comparisons else []
    header = [*lead, "row", "base", "folds", "Δ UA", f"{ci} of Δ", "Wilcoxon p", "smallest p",
              "significant?"]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * (len(lead) + 2) + "---:|" * 5 + "---|"]
    for r in comparisons.itertuples():
        cells = [r.comparison] if lead else []
        cells += [r.row, r.base, str(r.folds), _cell(r.delta_ua), _interval(r.delta_ci_low, r.delta_ci_high),
                  f"{r.p:.4g}", f"{r.p_min:.4g}", _significance(r.significant)]
        out.append("| " + " | ".join(cells) + " |")
    return out


def markdown(frame: pd.DataFrame, corpus: str, steps: pd.DataFrame | None = None,
             confidence: float = 0.95, headline: pd.DataFrame | None = None) -> str:
    """A table shaped like the paper's, one section per table, then the ablation steps and
    the headline comparisons."""
    out = [f"# Ablation on `{corpus}`: test UA (%), mean ± std over speaker folds\n"]
    titles = {
        "table1": "Table 1: CNN section, pooling and loss",
        "table3": "Table 3: SPP schemes on the CNN with FF",
    }
    ci = f"{_percent(confidence)} CI"
    for table, part in frame.groupby("table", sort=True):
        ref = part["paper_corpus"].iloc[0]
        note = "" if ref == corpus else f", a different corpus from this run's `{corpus}`"
        out.append(f"\n## {titles[table]}\n")
        out.append(f"Paper UA: the published figure on {ref.upper()}{note}. {ci}: Student-t interval "
                   "of the mean UA over the folds (- with fewer than 2 folds).\n")
        out.append(
            f"| row | CNN section | pooling | loss | folds | UA | {ci} | paper UA | Δ | WA | macro-F1 "
            "| pooled UA |"
        )
        out.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in part.itertuples():
            out.append(
                f"| {r.row} | {r.cnn} | {r.pooling} | {r.loss} | {r.folds} | "
                f"{r.ua_mean:.2f} ± {r.ua_std:.2f} | {_interval(r.ua_ci_low, r.ua_ci_high)} | "
                f"{_cell(r.paper_ua)} | {_cell(r.diff)} | "
                f"{r.wa_mean:.2f} | {r.macro_f1:.2f} | {r.pooled_ua:.2f} |"
            )
    if steps is not None and len(steps):
        out.append("\n## Ablation steps: paired comparisons\n")
        out.append(
            "Each row against the row it modifies (`ablation.steps`), on the same test speakers. "
            f"Δ UA: the mean over folds of the row's fold UA minus the base row's (points); {ci}: "
            "paired Student-t interval of that mean (it assumes normally distributed fold "
            "differences); p: two-sided Wilcoxon signed-rank test, which assumes only symmetric "
            "differences (zero differences dropped); smallest p: the lowest p these folds can give at all "
            "(2 / 2^n for n nonzero differences). Not significant: the interval contains 0. With "
            "fewer than 6 folds no Wilcoxon p reaches 0.05: read the interval with the smallest p.\n"
        )
        out += _comparison_lines(steps, ci)
    if headline is not None and len(headline):
        out.append("\n## Headline: the best CNN row and the proposed row\n")
        out.append(
            "The same paired comparison for what the tables are read for: the CNN row with the "
            "highest mean UA against the baseline, and the paper's proposed row (multi-dilated "
            "blocks, SPP, attention, ArcFace) against the baseline and against that best row.\n")
        out += _comparison_lines(headline, ci)
    return "\n".join(out) + "\n"


def write_tables(frame: pd.DataFrame, corpus: str, stem: Any, steps: pd.DataFrame | None = None,
                 confidence: float = 0.95, headline: pd.DataFrame | None = None) -> None:
    """`stem`.md, .csv and .json, byte-identical for identical inputs.

    The csv holds the table lines, then the step lines (`table` = "steps"), then the
    headline lines (`table` = "headline"); the json is {table1: {row: {...}}, table3: {...},
    steps: {row: {base, folds, delta_ua, ...}}, headline: {comparison: {row, base, ...}}}.
    """
    stem.with_suffix(".md").write_text(markdown(frame, corpus, steps, confidence, headline),
                                       encoding="utf-8", newline="\n")
    parts = [frame] + [part.assign(table=name) for name, part in (("steps", steps), ("headline", headline))
                       if part is not None]
    csv = pd.concat(parts, ignore_index=True)
    csv.to_csv(stem.with_suffix(".csv"), index=False, lineterminator="\n")
    records: dict[str, dict[str, Any]] = {}
    for r in json.loads(frame.to_json(orient="records")):
        records.setdefault(r["table"], {})[r["row"]] = {k: r[k] for k in JSON_COLUMNS}
    if steps is not None:
        for r in json.loads(steps.to_json(orient="records")):
            records.setdefault("steps", {})[r["row"]] = {k: r[k] for k in STEP_COLUMNS}
    if headline is not None:
        for r in json.loads(headline.to_json(orient="records")):
            records.setdefault("headline", {})[r["comparison"]] = {k: r[k] for k in ("row", *STEP_COLUMNS)}
    stem.with_suffix(".json").write_text(json.dumps(records, indent=2, sort_keys=True) + "\n")


# --- did training converge? -----------------------------------------------------------


def convergence_frame(histories: dict[str, pd.DataFrame], max_epochs: int, tail: int) -> pd.DataFrame:
    """Per row, from its folds' training curves (results/<row>/history.csv): epochs run,
    best epoch, how many folds early stopping ended, the best validation UA and the
    mean validation UA over each fold's last `tail` epochs (%, means over folds).

    A curve has flattened when its last epochs are near its best; one still rising
    ends at max_epochs with its best epoch among the last.
    """
    lines = []
    for row, history in sorted(histories.items()):
        per_fold = [
            {"epochs": int(h["epoch"].max()), "best_epoch": int(h.loc[h["val_ua"].idxmax(), "epoch"]),
             "best": float(h["val_ua"].max()), "last": float(h["val_ua"].tail(tail).mean())}
            for _, h in history.sort_values(["fold", "epoch"]).groupby("fold")
        ]
        folds = pd.DataFrame(per_fold)
        lines.append({
            "row": row, "folds": len(folds), "epochs_mean": folds["epochs"].mean(),
            "epochs_min": int(folds["epochs"].min()), "epochs_max": int(folds["epochs"].max()),
            "best_epoch_mean": folds["best_epoch"].mean(),
            "stopped_early": int((folds["epochs"] < max_epochs).sum()),
            "best_val_ua": 100 * folds["best"].mean(), "last_val_ua": 100 * folds["last"].mean(),
        })
    return pd.DataFrame(lines).round(2)


def convergence_markdown(frame: pd.DataFrame, max_epochs: int, patience: int, tail: int) -> str:
    stop = f"early stopping after {patience} epochs without a better validation UA" if patience else \
        "no early stopping"
    out = [
        "# Training: did each row's curves flatten?\n",
        f"Per row, means over its folds; cap {max_epochs} epochs, {stop}. Validation UA (%) on the "
        f"fold's validation speaker: its best, and its mean over the last {tail} epochs a fold ran.\n",
        "| row | folds | epochs run (min–max) | best epoch | stopped early | best val UA | "
        f"last {tail} epochs' val UA |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in frame.itertuples():
        out.append(f"| {r.row} | {r.folds} | {r.epochs_mean:.1f} ({r.epochs_min}–{r.epochs_max}) | "
                   f"{r.best_epoch_mean:.1f} | {r.stopped_early} of {r.folds} | {r.best_val_ua:.2f} | "
                   f"{r.last_val_ua:.2f} |")
    return "\n".join(out) + "\n"


# --- the ablation figure ------------------------------------------------------------------


def plot_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """One line per row of the tables (the baseline first): its UA, interval and the
    paper's figure (the first table that has one for the row), all in %."""
    lines: dict[str, dict[str, Any]] = {}
    for r in frame.itertuples():
        line = lines.setdefault(r.row, {"row": r.row, "ua": r.ua_mean, "ci_low": r.ua_ci_low,
                                        "ci_high": r.ua_ci_high, "paper_ua": None, "paper_corpus": None})
        if line["paper_ua"] is None and not pd.isna(r.paper_ua):
            line |= {"paper_ua": r.paper_ua, "paper_corpus": r.paper_corpus}
    ordered = [lines.pop(BASELINE)] if BASELINE in lines else []
    plot = pd.DataFrame(ordered + list(lines.values()), columns=list(PLOT_COLUMNS))
    return plot.astype({"ua": float, "ci_low": float, "ci_high": float, "paper_ua": float})


def ablation_figure(plot: pd.DataFrame, corpus: str, confidence: float) -> Any:
    """UA per row with its interval (horizontal error bars), the baseline as a vertical
    line (its interval shaded) and the paper's figure as a marker per reference corpus."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = plot[plot["row"] != BASELINE].reset_index(drop=True)
    y = np.arange(len(rows))[::-1]
    fig, ax = plt.subplots(figsize=(7.5, 1.4 + 0.38 * len(rows)))
    base = plot[plot["row"] == BASELINE]
    if len(base):
        b = base.iloc[0]
        label = f"baseline (logistic regression): {b['ua']:.2f}"
        if not pd.isna(b["ci_low"]):
            ax.axvspan(b["ci_low"], b["ci_high"], color="0.88", zorder=0)
            label += ", its interval shaded"
        ax.axvline(b["ua"], color="0.3", linestyle="--", zorder=1, label=label)
    has_ci = ~rows["ci_low"].isna()
    xerr = np.vstack([
        np.where(has_ci, rows["ua"] - rows["ci_low"], 0.0),
        np.where(has_ci, rows["ci_high"] - rows["ua"], 0.0),
    ])
    ax.errorbar(rows["ua"], y, xerr=xerr, fmt="o", color="tab:blue", capsize=3, zorder=3,
                label=f"ours: mean UA, {_percent(confidence)} t interval")
    markers = {"emodb": ("x", "tab:red"), "iemocap": ("+", "tab:green")}
    for ref, part in rows[~rows["paper_ua"].isna()].groupby("paper_corpus", sort=True):
        marker, color = markers.get(ref, ("s", "tab:purple"))
        ax.scatter(part["paper_ua"], y[part.index], marker=marker, color=color, s=50, zorder=4,
                   label=f"paper's figure ({ref.upper()})")
    ax.set_yticks(y, rows["row"])
    ax.set_xlabel(f"test UA (%) on {corpus}")
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.grid(axis="x", color="0.9", zorder=0)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.01), ncol=2, fontsize="small", frameon=False)
    fig.tight_layout()
    return fig


def write_figure(plot: pd.DataFrame, corpus: str, confidence: float, png: Any, csv: Any) -> None:
    """The ablation figure as a PNG (byte-identical for identical inputs: Agg, no
    Software metadata) and its data as a csv for `dvc plots`."""
    import matplotlib.pyplot as plt

    plot.to_csv(csv, index=False, lineterminator="\n")
    fig = ablation_figure(plot, corpus, confidence)
    fig.savefig(png, dpi=80, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
