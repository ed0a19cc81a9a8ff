"""How much of the built-in corpus's emotion its generator put there, and how much of it
the features carry: the ceiling the ablation rows are read against.

Each synthetic utterance is rendered from per-utterance parameters (`synth.draw_params`:
F0 level and range, speech rate, level, voice quality, F0 drift, formants, final rise)
that depend on its emotion, its speaker and random variation. This module classifies
emotion from those parameters themselves, before any audio: each parameter (log of the
multiplicative ones) standardised per speaker, multinomial logistic regression with
balanced class weights, leave-one-speaker-out, unweighted accuracy (UA) averaged over the
speakers. What it reaches is about what a model of the audio could reach if it recovered
the parameters exactly: a ceiling for the ablation rows and the baseline, and a measure
of how far below it they are. `recoverability` asks the other side: how well each
parameter can be predicted (leave-one-speaker-out ridge regression, R^2) from the
baseline row's per-utterance log-mel statistics, i.e. what of it reaches the features.

    python -m mdser.ceiling                          # the corpus of params.yaml, a large draw
    python -m mdser.ceiling --features data/features # and each parameter from its features
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from mdser.corpora.synth import EMODB_COUNTS, IEMOCAP_COUNTS, _emodb_name, draw_params, plan
from mdser.errors import UserError, run_stage

# The parameters of `draw_params` that carry emotion, in groups; the others (noise floor,
# microphone) do not depend on it.
GROUPS = {
    "prosody (F0 level and range, rate, level)": ["f0_hz", "range_st", "rate", "level_db"],
    "voice quality (jitter, shimmer, breath, open quotient, tilt)":
        ["jitter", "shimmer", "breath", "oq", "tilt"],
    "F0 drift, formants, final rise": ["drift_st", "formant", "rise"],
}
PARAMETERS = [name for names in GROUPS.values() for name in names]
MULTIPLICATIVE = {"f0_hz", "range_st", "rate", "jitter", "shimmer", "drift_st", "formant"}


def generator_parameters(synth: dict[str, Any]) -> tuple[np.ndarray, list[str], list[str]]:
    """The parameters every utterance of the `data.synth` corpus was rendered from, in
    `synth.plan`'s order: the same seeds and draws as `synth.generate`, without the audio.
    Returns (n, len(PARAMETERS)) float64 (logs of the multiplicative ones), the emotions
    and the speakers."""
    items = plan(synth)
    rows = []
    for item in items:
        p = draw_params(item["emotion"], item["speaker"], np.random.default_rng(item["seed"]))
        rows.append([np.log(p[k]) if k in MULTIPLICATIVE else p[k] for k in PARAMETERS])
    return (np.array(rows, dtype=np.float64), [it["emotion"] for it in items],
            [it["speaker"]["speaker"] for it in items])


def speaker_standardized(x: np.ndarray, speakers: list[str]) -> np.ndarray:
    """Each speaker's rows standardised by that speaker's own mean and std (a constant
    column stays 0): `features.speaker_standardized`, which `train.standardize: speaker`
    applies to the features, with each row as a one-frame utterance."""
    import pandas as pd

    from mdser.features import speaker_standardized as standardized_frames

    rows = pd.DataFrame({"offset": np.arange(len(x)), "frames": 1, "speaker": speakers})
    return standardized_frames(x, rows).astype(np.float64)


def leave_one_speaker_out_ua(x: np.ndarray, emotions: list[str], speakers: list[str]) -> list[float]:
    """Per held-out speaker, the UA of a logistic regression (C = 1, balanced class
    weights) fitted on the other speakers' rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import recall_score

    y, speakers = np.asarray(emotions), np.asarray(speakers)
    uas = []
    for s in np.unique(speakers):
        test = speakers == s
        model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000)
        model.fit(x[~test], y[~test])
        present = np.unique(y[test])  # UA: the mean recall over the speaker's classes
        uas.append(float(recall_score(y[test], model.predict(x[test]), labels=present,
                                      average="macro")))
    return uas


def ceiling(synth: dict[str, Any]) -> dict[str, list[float]]:
    """Leave-one-speaker-out UAs from all parameters, from each group of them, and from all
    but the cycle-to-cycle ones (jitter, shimmer), which log-mel frames do not carry."""
    x, emotions, speakers = generator_parameters(synth)
    x = speaker_standardized(x, speakers)
    out = {"all parameters": leave_one_speaker_out_ua(x, emotions, speakers)}
    without_cycle = [p for p in PARAMETERS if p not in ("jitter", "shimmer")]
    for group, names in (GROUPS | {"all but jitter and shimmer": without_cycle}).items():
        columns = [PARAMETERS.index(name) for name in names]
        out[group] = leave_one_speaker_out_ua(x[:, columns], emotions, speakers)
    return out


RIDGE_ALPHAS = np.logspace(-1, 5, 13)


def ridge(alpha: float) -> Any:
    """Ridge regression on inputs standardised by the rows it is fitted on."""
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), Ridge(alpha=alpha))


def ridge_predictions(x: np.ndarray, y: np.ndarray, speakers: np.ndarray, alpha: float) -> np.ndarray:
    """Each speaker's rows of `y` predicted by `ridge(alpha)` fitted on the other speakers'."""
    out = np.zeros_like(y)
    for s in np.unique(speakers):
        test = speakers == s
        out[test] = ridge(alpha).fit(x[~test], y[~test]).predict(x[test])
    return out


def recoverability(statistics: np.ndarray, parameters: np.ndarray,
                   speakers: list[str]) -> dict[str, float]:
    """Per parameter, R^2 of its prediction from the per-utterance `statistics` (rows
    aligned with `parameters`, standardised per speaker, so that R^2 = 0 is the speaker's
    own mean): for each held-out speaker, ridge regression with the alpha (per parameter,
    from RIDGE_ALPHAS) that predicts best across the other speakers when each of them is
    held out in turn, fitted on all of them; the held-out speaker is never seen."""
    y, speakers = speaker_standardized(parameters, speakers), np.asarray(speakers)
    predicted = np.zeros_like(y)
    for s in np.unique(speakers):
        test = speakers == s
        x_fit, y_fit, fit_speakers = statistics[~test], y[~test], speakers[~test]
        errors = [((ridge_predictions(x_fit, y_fit, fit_speakers, a) - y_fit) ** 2).sum(axis=0)
                  for a in RIDGE_ALPHAS]
        best = RIDGE_ALPHAS[np.argmin(errors, axis=0)]
        for alpha in np.unique(best):
            columns = best == alpha
            model = ridge(alpha).fit(x_fit, y_fit[:, columns])
            predicted[np.ix_(test, columns)] = model.predict(statistics[test]).reshape(-1, columns.sum())
    residual = ((y - predicted) ** 2).sum(axis=0) / ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    return dict(zip(PARAMETERS, (float(1 - r) for r in residual), strict=True))


def feature_recoverability(store: Path, synth: dict[str, Any]) -> dict[str, float]:
    """`recoverability` from the baseline row's statistics of the feature store `store`
    (written by `featurize` from the `data.synth` corpus in EMODB's layout, whose
    utterance ids are the file names), speaker-normalised as `train.standardize: speaker`
    normalises them."""
    from mdser.baseline import utterance_statistics
    from mdser.features import input_frames
    from mdser.stores import open_features

    if synth["layout"] != "emodb":
        raise UserError(f"--features needs data.synth.layout: emodb, not {synth['layout']!r}")
    rows, frames = open_features(Path(store))
    parameters, _, speakers = generator_parameters(synth)
    position = {_emodb_name(item): i for i, item in enumerate(plan(synth))}
    if set(rows["utt_id"]) != set(position):
        raise UserError(f"{store} holds {len(rows)} utterances, not the {len(position)} of the "
                        "data.synth corpus of params.yaml; featurize that corpus first")
    order = [position[u] for u in rows["utt_id"]]
    statistics = utterance_statistics(input_frames(frames, rows, "speaker"), rows)
    return recoverability(statistics, parameters[order], [speakers[i] for i in order])


def main(argv: list[str] | None = None) -> None:
    from mdser.params import load_params

    parser = argparse.ArgumentParser(prog="python -m mdser.ceiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draw", type=int, default=20000,
                        help="utterances of the large draw (same speakers and generator)")
    parser.add_argument("--features", type=Path,
                        help="a feature store of this corpus (data/features after `dvc repro`)")
    args = parser.parse_args(argv)
    synth = load_params()["data"]["synth"]
    n_classes = len(IEMOCAP_COUNTS if synth["layout"] == "iemocap" else EMODB_COUNTS)
    print(f"Emotion from the generator's parameters, leave-one-speaker-out UA (%), "
          f"chance {100 / n_classes:.1f}; mean ± std over the {synth['speakers']} speakers")
    for n in (int(synth["utterances"]), args.draw):
        print(f"\n{n} utterances (data.synth with utterances: {n}):")
        for group, uas in ceiling(synth | {"utterances": n}).items():
            print(f"  {100 * np.mean(uas):5.1f} ± {100 * np.std(uas, ddof=1):4.1f}  {group}")
    if args.features:
        print(f"\nEach parameter from the baseline's log-mel statistics of {args.features} "
              "(leave-one-speaker-out ridge regression, R^2; 0 = the speaker's mean):")
        for name, r2 in feature_recoverability(args.features, synth).items():
            print(f"  {r2:6.3f}  {name}")


if __name__ == "__main__":
    run_stage(main)
