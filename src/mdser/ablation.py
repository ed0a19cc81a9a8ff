"""The paper's ablation tables (Table 1 and Table 3), built from per-row summaries.

The same function builds the table from DVC's per-row results and from MLflow's
parent runs, so the two can be compared byte for byte.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

JSON_COLUMNS = ("ua_mean", "ua_std", "wa_mean", "macro_f1", "paper_ua")
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


def table_frame(
    params: dict[str, Any], models: dict[str, dict[str, Any]],
    summaries: dict[str, dict[str, Any]], corpus: str,
) -> pd.DataFrame:
    """One line per (table, row) that was run: ours beside the paper's figure."""
    lines = []
    for table in ("table1", "table3"):
        ref = reference_corpus(corpus, table)
        for row, paper in params["tables"][table].items():
            if row not in summaries:
                continue
            s, m = summaries[row], models[row]
            figure = paper.get(ref)
            ua = round(100 * s["ua_mean"], 2)
            lines.append({
                "table": table, "row": row, "cnn": CONV_NAMES[m["conv"]], "pooling": pooling_name(m),
                "loss": "ArcFace" if m["head"] == "arcface" else "Softmax",
                "folds": int(s["n_folds"]),
                "ua_mean": ua, "ua_std": round(100 * s["ua_std"], 2),
                "wa_mean": round(100 * s["wa_mean"], 2),
                "macro_f1": round(100 * s["macro_f1_mean"], 2),
                "pooled_ua": round(100 * s["pooled_ua"], 2),
                "paper_corpus": ref, "paper_ua": figure,
                "diff": None if figure is None else round(ua - figure, 2),
            })
    return pd.DataFrame(lines)


def _cell(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and pd.isna(v)) else f"{v:.2f}"


def markdown(frame: pd.DataFrame, corpus: str) -> str:
    """A table shaped like the paper's, one section per table."""
    out = [f"# Ablation on `{corpus}`: test UA (%), mean ± std over speaker folds\n"]
    titles = {
        "table1": "Table 1: CNN section, pooling and loss",
        "table3": "Table 3: SPP schemes on the CNN with FF",
    }
    for table, part in frame.groupby("table", sort=True):
        ref = part["paper_corpus"].iloc[0]
        note = "" if ref == corpus else f", a different corpus from this run's `{corpus}`"
        out.append(f"\n## {titles[table]}\n")
        out.append(f"Paper UA: the published figure on {ref.upper()}{note}.\n")
        out.append(
            "| row | CNN section | pooling | loss | folds | UA | paper UA | Δ | WA | macro-F1 | pooled UA |"
        )
        out.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in part.itertuples():
            out.append(
                f"| {r.row} | {r.cnn} | {r.pooling} | {r.loss} | {r.folds} | "
                f"{r.ua_mean:.2f} ± {r.ua_std:.2f} | {_cell(r.paper_ua)} | {_cell(r.diff)} | "
                f"{r.wa_mean:.2f} | {r.macro_f1:.2f} | {r.pooled_ua:.2f} |"
            )
    return "\n".join(out) + "\n"


def write_tables(frame: pd.DataFrame, corpus: str, stem: Any) -> None:
    """`stem`.md, .csv and .json, byte-identical for identical inputs."""
    stem.with_suffix(".md").write_text(markdown(frame, corpus), encoding="utf-8", newline="\n")
    frame.to_csv(stem.with_suffix(".csv"), index=False, lineterminator="\n")
    records: dict[str, dict[str, Any]] = {}
    for r in json.loads(frame.to_json(orient="records")):
        records.setdefault(r["table"], {})[r["row"]] = {k: r[k] for k in JSON_COLUMNS}
    stem.with_suffix(".json").write_text(json.dumps(records, indent=2, sort_keys=True) + "\n")
