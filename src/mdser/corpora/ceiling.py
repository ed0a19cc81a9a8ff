"""How much of the built-in corpus's emotion its generator put there: the ceiling.

Each synthetic utterance is rendered from per-utterance parameters (`synth.draw_params`:
F0 level and range, speech rate, level, voice quality, F0 drift, formants, final rise)
that depend on its emotion, its speaker and random variation. This module classifies
emotion from those parameters themselves, before any audio: each parameter (log of the
multiplicative ones) standardised per speaker, multinomial logistic regression with
balanced class weights, leave-one-speaker-out, unweighted accuracy (UA) averaged over the
speakers. What it reaches is about what a model of the audio could reach if it recovered
the parameters exactly: a ceiling for the ablation rows and the baseline, and a measure
of how far below it they are.

    python -m mdser.corpora.ceiling            # the corpus of params.yaml, and a large draw
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from mdser.corpora.synth import EMODB_COUNTS, IEMOCAP_COUNTS, draw_params, plan

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
    """The parameters every utterance of the `data.synth` corpus was rendered from: the
    same seeds and draws as `synth.generate`, without the audio. Returns (n, len(PARAMETERS))
    float64 (logs of the multiplicative ones), the emotions and the speakers."""
    items = plan(synth)
    rows = []
    for item in items:
        p = draw_params(item["emotion"], item["speaker"], np.random.default_rng(item["seed"]))
        rows.append([np.log(p[k]) if k in MULTIPLICATIVE else p[k] for k in PARAMETERS])
    return (np.array(rows, dtype=np.float64), [it["emotion"] for it in items],
            [it["speaker"]["speaker"] for it in items])


def speaker_standardized(x: np.ndarray, speakers: list[str]) -> np.ndarray:
    """Each speaker's rows standardised by that speaker's own mean and std (a constant
    column stays 0), as `train.standardize: speaker` treats the features."""
    out, speakers = np.zeros_like(x), np.asarray(speakers)
    for s in np.unique(speakers):
        rows = speakers == s
        std = x[rows].std(axis=0)
        out[rows] = (x[rows] - x[rows].mean(axis=0)) / np.where(std > 0, std, 1.0)
    return out


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
    """Leave-one-speaker-out UAs from all parameters and from each group of them."""
    x, emotions, speakers = generator_parameters(synth)
    x = speaker_standardized(x, speakers)
    out = {"all parameters": leave_one_speaker_out_ua(x, emotions, speakers)}
    for group, names in GROUPS.items():
        columns = [PARAMETERS.index(name) for name in names]
        out[group] = leave_one_speaker_out_ua(x[:, columns], emotions, speakers)
    return out


def main(argv: list[str] | None = None) -> None:
    from mdser.params import load_params

    parser = argparse.ArgumentParser(prog="python -m mdser.corpora.ceiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draw", type=int, default=20000,
                        help="utterances of the large draw (same speakers and generator)")
    args = parser.parse_args(argv)
    synth = load_params()["data"]["synth"]
    n_classes = len(IEMOCAP_COUNTS if synth["layout"] == "iemocap" else EMODB_COUNTS)
    print(f"Emotion from the generator's parameters, leave-one-speaker-out UA (%), "
          f"chance {100 / n_classes:.1f}; mean ± std over the {synth['speakers']} speakers")
    for n in (int(synth["utterances"]), args.draw):
        print(f"\n{n} utterances (data.synth with utterances: {n}):")
        for group, uas in ceiling(synth | {"utterances": n}).items():
            print(f"  {100 * np.mean(uas):5.1f} ± {100 * np.std(uas, ddof=1):4.1f}  {group}")


if __name__ == "__main__":
    main()
