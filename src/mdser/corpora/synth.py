"""The built-in corpus: a seeded source-filter speech synthesizer with acted emotions.

Each utterance is rendered from
- a glottal source: Rosenberg pulses along an F0 contour (declination,
  accents on stressed syllables, a final fall or rise, slow drift), with
  cycle-to-cycle jitter and shimmer, and flow-modulated aspiration noise;
- a vocal tract: cascades of 2nd-order formant resonators (Klatt) for five
  vowels and a nasal murmur, cross-faded along the syllable sequence, formants
  scaled by the speaker's vocal-tract length;
- consonants: band-passed noise (s, sh, f) and plosive bursts after a closure;
- a syllable-rate amplitude envelope, phrase pauses, a recording noise floor.

Emotions move the prosodic and voice-quality parameters the way Murray &
Arnott (1993) and Banse & Scherer (1996) describe acted emotions (see
PROFILES). Every utterance draws an expression intensity (0.1 to 1.5 times the
profile's distance from neutral) and independent variation of every
parameter, so neighbouring emotions overlap and the corpus is not trivially
separable. Texts (syllable sequences) are shared across speakers and
emotions, like EMODB's ten sentences.

Layouts: "emodb" writes `raw_dir/wav/SSTTTEV.wav` with EMODB's speaker ids
and genders; "iemocap" writes `raw_dir/IEMOCAP_full_release` with five
sessions, improvised dialogs and EmoEvaluation files. Both also write
`raw_dir/speakers.csv`. The same seed gives byte-identical files.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.ndimage import uniform_filter1d
from scipy.signal import butter, lfilter, sosfilt

from mdser.console import progress_bar
from mdser.corpora.emodb import EMOTION_LETTERS, SPEAKER_GENDERS

EMODB_COUNTS = {  # EMODB's 535 utterances per class
    "anger": 127, "boredom": 81, "disgust": 46, "fear": 69,
    "happiness": 71, "sadness": 62, "neutral": 79,
}
IEMOCAP_COUNTS = {"neutral": 1099, "happiness": 284, "sadness": 608, "anger": 289}
IEMOCAP_CODE = {"neutral": "neu", "happiness": "hap", "sadness": "sad", "anger": "ang"}
EMODB_TEXTS = ["a01", "a02", "a04", "a05", "a07", "b01", "b02", "b03", "b09", "b10"]
LETTER_OF = {name: letter for letter, name in EMOTION_LETTERS.items()}

# Emotion profiles relative to the speaker's neutral voice:
# f0 shift (semitones), f0 range (x), speech rate (x), level (dB), jitter and
# shimmer (relative cycle-to-cycle sd), breath (aspiration level), oq (glottal
# open quotient: low = tense, bright; high = lax, breathy), tilt (extra
# high-frequency emphasis), drift (irregular F0 movement, semitones sd),
# formant (x, e.g. smiling raises formants), rise (probability of a final rise).
PROFILES: dict[str, dict[str, float]] = {
    "neutral":   dict(f0=0.0, range=1.00, rate=1.00, level=0.0, jitter=0.008, shimmer=0.04,
                      breath=0.12, oq=0.60, tilt=0.00, drift=0.30, formant=1.00, rise=0.10),
    "anger":     dict(f0=4.5, range=1.50, rate=1.12, level=8.0, jitter=0.012, shimmer=0.05,
                      breath=0.06, oq=0.42, tilt=0.45, drift=0.50, formant=1.03, rise=0.05),
    "happiness": dict(f0=4.0, range=1.70, rate=1.08, level=4.0, jitter=0.010, shimmer=0.04,
                      breath=0.12, oq=0.55, tilt=0.15, drift=0.50, formant=1.05, rise=0.30),
    "fear":      dict(f0=6.0, range=1.10, rate=1.22, level=1.5, jitter=0.030, shimmer=0.08,
                      breath=0.28, oq=0.60, tilt=0.10, drift=1.30, formant=1.02, rise=0.40),
    "sadness":   dict(f0=-1.5, range=0.55, rate=0.78, level=-5.0, jitter=0.016, shimmer=0.06,
                      breath=0.40, oq=0.75, tilt=-0.25, drift=0.40, formant=0.98, rise=0.05),
    "boredom":   dict(f0=-2.0, range=0.50, rate=0.86, level=-3.0, jitter=0.009, shimmer=0.04,
                      breath=0.18, oq=0.68, tilt=-0.15, drift=0.25, formant=0.99, rise=0.05),
    "disgust":   dict(f0=-2.5, range=1.15, rate=0.76, level=-0.5, jitter=0.020, shimmer=0.07,
                      breath=0.22, oq=0.55, tilt=0.05, drift=0.80, formant=0.97, rise=0.10),
}

# Formants (Hz) and bandwidths of an adult male vocal tract (Peterson & Barney style).
VOWELS = {
    "a": ([730, 1090, 2440, 3400], [80, 90, 120, 180]),
    "e": ([530, 1840, 2480, 3500], [60, 100, 120, 180]),
    "i": ([270, 2290, 3010, 3700], [50, 100, 140, 200]),
    "o": ([570, 840, 2410, 3300], [70, 80, 110, 170]),
    "u": ([300, 870, 2240, 3300], [60, 80, 110, 170]),
    "m": ([250, 1100, 2300, 3300], [60, 200, 250, 250]),  # nasal murmur
}
VOICED = list(VOWELS)
NOISES = {"s": (3800, 7500, 0.30), "sh": (2200, 4500, 0.25), "f": (1200, 6500, 0.10),
          "burst": (1500, 5000, 0.45)}
NOISE_KINDS = list(NOISES)
BASE_SYLLABLE_RATE = 5.0  # syllables per second, neutral
SPEAKER_FIELDS = ["speaker", "gender", "f0_hz", "f0_range_st", "formant_scale", "rate", "level_db"]


# ---------------------------------------------------------------- plan


def class_counts(total: int, table: dict[str, int]) -> dict[str, int]:
    """Split `total` over classes in the proportions of `table` (largest remainder)."""
    weights = np.array(list(table.values()), dtype=float)
    raw = total * weights / weights.sum()
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return dict(zip(table, (int(c) for c in counts), strict=True))


def speaker_table(n: int, layout: str, seed: int) -> list[dict]:
    """Speaker ids, genders and voice parameters (F0, range, vocal-tract scale, rate, level)."""
    if layout == "iemocap":
        ids = [f"Ses{i // 2 + 1:02d}{'FM'[i % 2]}" for i in range(n)]
        genders = ["f" if i % 2 == 0 else "m" for i in range(n)]
    else:
        ids = list(SPEAKER_GENDERS)[:n] + [f"{17 + i:02d}" for i in range(max(0, n - 10))]
        genders = [SPEAKER_GENDERS.get(s, "mf"[i % 2]) for i, s in enumerate(ids)]
    table = []
    for i, (sid, gender) in enumerate(zip(ids, genders, strict=True)):
        rng = np.random.default_rng([seed, 1, i])
        male = gender == "m"
        table.append({
            "speaker": sid, "gender": gender,
            "f0_hz": round(float(rng.uniform(92, 135) if male else rng.uniform(170, 240)), 2),
            "f0_range_st": round(float(rng.uniform(3.0, 6.0)), 3),
            "formant_scale": round(float(rng.uniform(0.94, 1.05) if male
                                         else rng.uniform(1.10, 1.21)), 4),
            "rate": round(float(rng.uniform(0.88, 1.12)), 4),
            "level_db": round(float(rng.normal(0.0, 2.0)), 3),
        })
    return table


def text_syllables(seed: int, text_index: int) -> list[dict]:
    """Syllable sequence of a text: onset, vowel, coda, stress; short (a) or long (b) text."""
    rng = np.random.default_rng([seed, 2, text_index])
    n = int(rng.integers(5, 10) if text_index < 5 else rng.integers(10, 15))
    onsets = ["", "s", "sh", "f", "p", "m"]
    codas = ["", "", "s", "m", "p"]
    first_stress = int(rng.integers(0, 2))
    return [{
        "onset": onsets[rng.choice(6, p=[0.2, 0.2, 0.1, 0.1, 0.25, 0.15])],
        "vowel": "aeiou"[rng.integers(0, 5)],
        "coda": codas[rng.integers(0, 5)],
        "stressed": (j - first_stress) % 3 == 0 or j == n - 1,
        "pause_after": text_index >= 5 and j == n // 2,
    } for j in range(n)]


def draw_params(emotion: str, speaker: dict, rng: np.random.Generator) -> dict:
    """Per-utterance parameters: neutral + intensity * (emotion - neutral) + variation."""
    neutral, emo = PROFILES["neutral"], PROFILES[emotion]
    k = float(np.clip(rng.normal(1.0, 0.3), 0.1, 1.5))  # expression intensity

    def mix(key: str) -> float:
        return neutral[key] + k * (emo[key] - neutral[key])

    logn = rng.lognormal
    return {
        "f0_hz": speaker["f0_hz"] * 2 ** ((mix("f0") + rng.normal(0, 1.2)) / 12),
        "range_st": speaker["f0_range_st"] * mix("range") * logn(0, 0.2),
        "rate": BASE_SYLLABLE_RATE * speaker["rate"] * mix("rate") * logn(0, 0.08),
        "level_db": -30.0 + speaker["level_db"] + mix("level") + rng.normal(0, 2.0),
        "jitter": mix("jitter") * logn(0, 0.3),
        "shimmer": mix("shimmer") * logn(0, 0.3),
        "breath": max(0.0, mix("breath") + rng.normal(0, 0.06)),
        "oq": float(np.clip(mix("oq") + rng.normal(0, 0.05), 0.3, 0.9)),
        "tilt": mix("tilt") + rng.normal(0, 0.1),
        "drift_st": mix("drift") * logn(0, 0.3),
        "formant": speaker["formant_scale"] * mix("formant") * rng.normal(1.0, 0.015),
        "rise": float(rng.random() < mix("rise")),
        "noise_db": -62.0 + rng.normal(0, 3),
        "mic": rng.uniform(-0.3, 0.3),
    }


# ---------------------------------------------------------------- rendering


def _segments(sylls: list[dict], p: dict, rng: np.random.Generator) -> list[tuple]:
    """(kind, seconds, syllable index) with kind in VOICED, NOISE_KINDS, 'closure', 'pause'."""
    base = 1.0 / p["rate"]
    segs: list[tuple] = [("pause", rng.uniform(0.12, 0.3), -1)]
    for j, s in enumerate(sylls):
        d = base * (1.25 if s["stressed"] else 0.85) * rng.lognormal(0, 0.12)
        if j == len(sylls) - 1:
            d *= 1.35  # phrase-final lengthening
        rest = d
        onset = s["onset"]
        if onset == "p":
            segs += [("closure", 0.2 * d, j), ("burst", 0.08 * d, j)]
            rest -= 0.28 * d
        elif onset in ("s", "sh", "f"):
            segs.append((onset, 0.32 * d, j))
            rest -= 0.32 * d
        elif onset == "m":
            segs.append(("m", 0.22 * d, j))
            rest -= 0.22 * d
        coda = s["coda"]
        coda_d = 0.18 * d if coda else 0.0
        segs.append((s["vowel"], rest - coda_d, j))
        if coda == "p":
            segs += [("closure", 0.6 * coda_d, j), ("burst", 0.4 * coda_d, j)]
        elif coda:
            segs.append((coda, coda_d, j))
        if s["pause_after"]:
            segs.append(("pause", rng.uniform(0.12, 0.3) / p["rate"] * BASE_SYLLABLE_RATE, -1))
    segs.append(("pause", rng.uniform(0.15, 0.35), -1))
    return segs


def _resonator_sos(freqs: list[float], bws: list[float], sr: int) -> np.ndarray:
    """Cascade of Klatt resonators (unity gain at 0 Hz) as second-order sections."""
    sos = []
    for f, b in zip(freqs, bws, strict=True):
        f = min(f, 0.45 * sr)
        r = np.exp(-np.pi * b / sr)
        c1, c2 = 2 * r * np.cos(2 * np.pi * f / sr), -r * r
        sos.append([1 - c1 - c2, 0, 0, 1, -c1, -c2])
    return np.array(sos)


@lru_cache(maxsize=64)
def _band_sos(kind: str, lo: float, hi: float, sr: int, order: int) -> np.ndarray:
    """Butterworth filter design, cached (designing costs more than filtering)."""
    if kind == "highpass":
        return butter(order, lo, "highpass", fs=sr, output="sos")
    return butter(order, [lo, min(hi, 0.45 * sr)], "bandpass", fs=sr, output="sos")


def _trapezoid(n: int, a: int, b: int, ramp: int) -> tuple[int, int, np.ndarray]:
    """Weights of segment [a, b) with linear cross-fades of 2*ramp samples at both ends.

    Adjacent segments' weights sum to one. Returns (start, stop, weights).
    """
    lo, hi = max(0, a - ramp), min(n, b + ramp)
    i = np.arange(lo, hi) + 0.5
    rise = np.clip((i - (a - ramp)) / (2 * ramp), 0, 1)
    fall = np.clip((b + ramp - i) / (2 * ramp), 0, 1)
    w = np.minimum(rise, fall)
    return lo, hi, w


def render(sylls: list[dict], p: dict, sr: int, rng: np.random.Generator) -> np.ndarray:
    """One utterance as float64 samples in [-1, 1]."""
    segs = _segments(sylls, p, rng)
    bounds = np.concatenate([[0], np.cumsum([max(1, int(round(d * sr))) for _, d, _ in segs])])
    n = int(bounds[-1])
    ramp = int(0.008 * sr)
    voicing = np.zeros(n)
    vowel_parts, noise_parts = [], []  # (kind, start, stop, cross-fade weights)
    env = np.ones(n)
    accent = np.zeros(n)  # F0 accent pattern in units of the range
    for (kind, _, j), a, b in zip(segs, bounds[:-1], bounds[1:], strict=True):
        if kind in VOWELS:
            part = (kind, *_trapezoid(n, a, b, ramp))
            vowel_parts.append(part)
            voicing[part[1]:part[2]] += part[3]
        elif kind in NOISES:
            noise_parts.append((kind, *_trapezoid(n, a, b, ramp // 2)))
        if kind in VOWELS and kind != "m":
            stressed = sylls[j]["stressed"]
            shape = np.sin(np.pi * (np.arange(b - a) + 0.5) / (b - a)) ** 0.5
            env[a:b] = (1.4 if stressed else 1.0) * (0.55 + 0.45 * shape)
            if stressed:
                width = 0.45 * (b - a)
                lo, hi = max(0, int(a - 3 * width)), min(n, int(b + 3 * width))
                x = (np.arange(lo, hi) - (a + b) / 2) / width
                accent[lo:hi] += rng.uniform(0.5, 1.0) * np.exp(-0.5 * x**2)
        if kind == "burst":
            env[a:b] = np.exp(-np.arange(b - a) / (0.25 * (b - a)))
    env = uniform_filter1d(env, int(0.005 * sr))  # no clicks at segment edges
    t = np.arange(n) / sr
    voicing = np.clip(voicing, 0.0, 1.0)

    # F0 contour (semitones around the utterance's mean), then Hz.
    speech = np.flatnonzero(voicing > 0.5)
    t0, t1 = (t[speech[0]], t[speech[-1]]) if speech.size else (0.0, t[-1])
    pos = np.clip((t - t0) / max(t1 - t0, 1e-3), 0, 1)
    knots = rng.normal(0, p["drift_st"], size=int(n / sr / 0.05) + 2)
    drift = np.interp(t, np.arange(knots.size) * 0.05, knots)
    final = np.clip((pos - 0.85) / 0.15, 0, 1) * (0.8 if p["rise"] else -0.6)
    st = p["range_st"] * (0.3 - 0.6 * pos + accent + final) + drift
    f0 = p["f0_hz"] * 2 ** (st / 12)

    # Glottal source: Rosenberg pulses with jitter and shimmer, aspiration noise.
    k0 = np.floor(np.cumsum(f0 / sr)).astype(int)
    f0 = f0 * (1 + p["jitter"] * rng.standard_normal(k0[-1] + 2)[k0])
    phase = np.cumsum(f0 / sr)
    k = np.floor(phase).astype(int)
    frac = phase - k
    oq, sq = p["oq"], 2.5
    tp, tn = oq * sq / (1 + sq), oq / (1 + sq)
    flow = np.where(frac < tp, 0.5 * (1 - np.cos(np.pi * frac / tp)),
                    np.where(frac < tp + tn, np.cos(0.5 * np.pi * (frac - tp) / tn), 0.0))
    flow *= np.clip(1 + p["shimmer"] * rng.standard_normal(k[-1] + 1)[k], 0.3, None)
    dflow = np.diff(flow, prepend=flow[0]) * sr / 200.0
    hiss = sosfilt(_band_sos("highpass", 1000, 0, sr, 2), rng.standard_normal(n))
    aspiration = hiss * (0.3 + flow) * p["breath"] * 1.5
    source = dflow + aspiration
    emph = float(np.clip(0.5 + p["tilt"], 0.0, 0.95))
    source = lfilter([1.0, -emph], [1.0], source)

    # Vocal tract: a resonator cascade per voiced segment (run in from 30 ms before it),
    # cross-faded into its neighbours.
    out = np.zeros(n)
    widen = 1 + 0.8 * p["breath"]
    tracts = {
        name: _resonator_sos([f * p["formant"] for f in freqs], [b * widen for b in bws], sr)
        for name, (freqs, bws) in VOWELS.items()
    }
    margin = int(0.03 * sr)
    for kind, lo, hi, w in vowel_parts:
        pad = min(margin, lo)
        seg = sosfilt(tracts[kind], source[lo - pad:hi])[pad:]
        out[lo:hi] += (0.35 if kind == "m" else 1.0) * w * seg
    out *= env
    active = voicing > 0.5
    out /= np.sqrt(np.mean(out[active] ** 2)) if active.any() else 1.0

    # Consonant noise (band-passed per segment), scaled relative to the vowels.
    for kind, lo, hi, w in noise_parts:
        f_lo, f_hi, level = NOISES[kind]
        pad = min(margin, lo)
        band = sosfilt(_band_sos("bandpass", f_lo, f_hi, sr, 4), rng.standard_normal(hi - lo + pad))
        band = band[pad:] / (np.sqrt(np.mean(band**2)) + 1e-12)
        out[lo:hi] += level * (1 + 0.5 * p["tilt"]) * w * env[lo:hi] * band

    # Level, microphone colouring, noise floor, peak guard.
    out *= 10 ** (p["level_db"] / 20)
    out = lfilter([1.0, p["mic"]], [1.0], out)
    out += 10 ** (p["noise_db"] / 20) * rng.standard_normal(n)
    peak = np.max(np.abs(out))
    if peak > 0.97:
        out *= 0.97 / peak
    return out


# ---------------------------------------------------------------- corpus


def plan(synth: dict) -> list[dict]:
    """Utterances to render: speaker, emotion, text, file name, seeds (no audio yet)."""
    layout, seed = synth["layout"], int(synth["seed"])
    n_spk, total = int(synth["speakers"]), int(synth["utterances"])
    table = IEMOCAP_COUNTS if layout == "iemocap" else EMODB_COUNTS
    speakers = speaker_table(n_spk, layout, seed)
    rng = np.random.default_rng([seed, 3])
    items = []
    for e, (emotion, count) in enumerate(class_counts(total, table).items()):
        per = np.full(n_spk, count // n_spk)
        per[rng.permutation(n_spk)[: count % n_spk]] += 1
        for s, m in enumerate(per):
            texts = [int(x) for x in rng.permutation(len(EMODB_TEXTS))]
            for r in range(int(m)):
                items.append({
                    "speaker": speakers[s], "emotion": emotion,
                    "text": texts[r % len(texts)], "version": r // len(texts),
                    "seed": [seed, 4, s, e, r],
                })
    return items


def _emodb_name(item: dict) -> str:
    text = EMODB_TEXTS[item["text"]]
    version = "abcdefghijklmnopqrstuvwxyz"[item["version"] % 26]
    return f"{item['speaker']['speaker']}{text}{LETTER_OF[item['emotion']]}{version}"


def generate(raw_dir: Path, synth: dict) -> None:
    """Write the built-in corpus (`data.synth` params) into raw_dir, replacing an old one."""
    raw_dir = Path(raw_dir)
    layout, seed, sr = synth["layout"], int(synth["seed"]), int(synth["sample_rate"])
    items = plan(synth)
    raw_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".synth-", dir=raw_dir))
    try:
        texts = {i: text_syllables(seed, i) for i in range(len(EMODB_TEXTS))}
        audio = []
        with progress_bar("synthesize", len(items)) as bar:
            for item in items:
                rng = np.random.default_rng(item["seed"])
                params = draw_params(item["emotion"], item["speaker"], rng)
                audio.append(render(texts[item["text"]], params, sr, rng))
                bar.update()
        if layout == "emodb":
            (tmp / "wav").mkdir()
            for item, y in zip(items, audio, strict=True):
                sf.write(tmp / "wav" / f"{_emodb_name(item)}.wav", y, sr, subtype="PCM_16")
            outputs = ["wav", "speakers.csv"]
        else:
            _write_iemocap(tmp, items, audio, sr, seed)
            outputs = ["IEMOCAP_full_release", "speakers.csv"]
        _write_speakers(tmp / "speakers.csv", speaker_table(int(synth["speakers"]), layout, seed))
        for name in ["wav", "IEMOCAP_full_release", "speakers.csv"]:
            old = raw_dir / name
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
        for name in outputs:
            os.replace(tmp / name, raw_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_speakers(path: Path, table: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, SPEAKER_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)


VAD = {"neutral": (3.0, 2.5, 2.5), "happiness": (4.0, 3.5, 3.0),
       "sadness": (2.0, 2.0, 2.0), "anger": (1.5, 4.0, 4.0)}


def _write_iemocap(tmp: Path, items: list[dict], audio: list, sr: int, seed: int) -> None:
    """IEMOCAP_full_release folders: per session two improvised dialogs, both speakers in each."""
    root = tmp / "IEMOCAP_full_release"
    rng = np.random.default_rng([seed, 5])
    by_session: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        by_session.setdefault(int(item["speaker"]["speaker"][3:5]), []).append(i)
    for s in range(1, 6):
        dialogs = [f"Ses{s:02d}F_impro{2 * s - 1:02d}", f"Ses{s:02d}M_impro{2 * s:02d}a"]
        turns: dict[str, list[int]] = {d: [] for d in dialogs}
        for i in by_session.get(s, []):
            turns[dialogs[int(rng.integers(0, 2))]].append(i)
        eval_dir = root / f"Session{s}" / "dialog" / "EmoEvaluation"
        eval_dir.mkdir(parents=True)
        for dialog, members in turns.items():
            wav_dir = root / f"Session{s}" / "sentences" / "wav" / dialog
            wav_dir.mkdir(parents=True)
            lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
            counter = {"F": 0, "M": 0}
            clock = 1.0
            for i in [members[j] for j in rng.permutation(len(members))]:
                letter = items[i]["speaker"]["speaker"][-1]
                utt = f"{dialog}_{letter}{counter[letter]:03d}"
                counter[letter] += 1
                sf.write(wav_dir / f"{utt}.wav", audio[i], sr, subtype="PCM_16")
                end = clock + len(audio[i]) / sr
                v, a, d = VAD[items[i]["emotion"]]
                lines += [
                    f"[{clock:.4f} - {end:.4f}]\t{utt}\t{IEMOCAP_CODE[items[i]['emotion']]}\t"
                    f"[{v:.4f}, {a:.4f}, {d:.4f}]",
                    f"C-E1:\t{items[i]['emotion'].capitalize()};\t()",
                    f"A-E1:\tval {v:.0f}; act {a:.0f}; dom  {d:.0f};\t()",
                    "",
                ]
                clock = end + 0.5
            (eval_dir / f"{dialog}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
