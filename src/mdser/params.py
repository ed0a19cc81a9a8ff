"""`params.yaml`: one schema, checked before any stage does any work.

Every key is declared here (pydantic, unknown keys rejected), so a misspelt or
mistyped parameter stops a stage with one message naming the key, the value and
what is allowed, before a single file is written.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mdser.errors import UserError

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class Synth(Strict):
    """The built-in corpus (`mdser.corpora.synth`); its bounds are the generator's only checks."""

    seed: int
    speakers: Annotated[int, Field(ge=2, le=90)]
    utterances: Annotated[int, Field(ge=14)]  # at least 2 per class of the 7-class layout
    sample_rate: Annotated[int, Field(ge=8000, le=96000)]
    layout: Literal["emodb", "iemocap"]

    @model_validator(mode="after")
    def _iemocap_speakers(self) -> Synth:
        if self.layout == "iemocap" and self.speakers != 10:
            raise ValueError(f"data.synth.speakers = {self.speakers}: the iemocap layout needs 10 "
                             "(5 sessions x 2)")
        return self


class Emodb(Strict):
    root: str
    url: str
    sha256: Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")]


class Iemocap(Strict):
    root: str
    classes: Annotated[list[Literal["neu", "hap", "sad", "ang"]], Field(min_length=2)]
    merge_exc_into_hap: bool
    include_scripted: bool


class Data(Strict):
    corpus: Literal["synth", "emodb", "iemocap"]
    min_duration: Annotated[float, Field(ge=0)]
    synth: Synth
    emodb: Emodb
    iemocap: Iemocap

    @model_validator(mode="after")
    def _roots_exist(self) -> Data:
        root = self.iemocap.root
        if self.corpus == "iemocap" and not (root and Path(root).is_dir()):
            raise ValueError(
                f"data.iemocap.root = {self.iemocap.root!r} is not a folder; with "
                "data.corpus: iemocap it must point at your IEMOCAP_full_release copy"
            )
        root = self.emodb.root
        if self.corpus == "emodb" and root and not Path(root).is_dir():
            raise ValueError(
                f"data.emodb.root = {root!r} is not a folder; set it to your unpacked EMODB "
                "copy (the folder holding wav/), or to \"\" to download data.emodb.url"
            )
        return self


class Audio(Strict):
    sample_rate: Annotated[int, Field(ge=8000)]


class Features(Strict):
    n_mels: Annotated[int, Field(ge=8)]
    n_fft: Annotated[int, Field(ge=64)]
    win_ms: PositiveFloat
    hop_ms: PositiveFloat
    delta_n: PositiveInt


class Split(Strict):
    seed: int


class RangeTest(Strict):
    """The paper's learning-rate range test ("Model training"): the learning rate grows
    geometrically from `lr_start` to `lr_end` over `epochs` epochs, the validation UA is
    measured at `points` evenly spaced steps, and the CLR bounds are read off that curve."""

    lr_start: PositiveFloat
    lr_end: PositiveFloat
    epochs: PositiveInt
    points: Annotated[int, Field(ge=4)]

    @model_validator(mode="after")
    def _increasing(self) -> RangeTest:
        if self.lr_start >= self.lr_end:
            raise ValueError(
                f"train.range_test.lr_start = {self.lr_start} must be below lr_end = {self.lr_end}")
        return self


def is_candidate(epoch: int, select_at: str) -> bool:
    """Whether a checkpoint may be selected after `epoch`: every epoch (`select_at: epoch`), or
    only where a CLR cycle ends (`cycle_end`: the stepsize is one epoch, Eq. 19, so every even
    epoch ends at lr_min). Smith (2017, the paper's CLR reference) stops "at the end of a
    cycle, which is when the learning rate is at the minimum value and the accuracy peaks";
    an epoch that ends at lr_max is a noisier model (README *Choices*)."""
    return select_at == "epoch" or epoch % 2 == 0


class Train(Strict):
    folds: PositiveInt
    max_epochs: PositiveInt
    batch_frames: Annotated[int, Field(ge=100)]
    lr_policy: Literal["range_test", "fixed"]
    lr_min: PositiveFloat
    lr_max: PositiveFloat
    range_test: RangeTest
    class_weight_alpha: Literal["auto"] | PositiveFloat
    patience: Annotated[int, Field(ge=0)]
    start_from_epoch: Annotated[int, Field(ge=0)]
    select_at: Literal["cycle_end", "epoch"]
    standardize: Literal["train", "global", "speaker"]
    vtlp: Annotated[float, Field(ge=0.0, lt=0.5)]
    seed: int
    mixed_precision: bool
    xla: bool

    @model_validator(mode="after")
    def _lr_range(self) -> Train:
        if self.lr_min > self.lr_max:
            raise ValueError(f"train.lr_min = {self.lr_min} must not exceed train.lr_max = {self.lr_max}")
        if self.select_at == "cycle_end" and self.patience == 1:
            raise ValueError("train.patience = 1 with train.select_at = cycle_end would stop before "
                             "the next cycle's end; use 0 (off) or at least 2")
        first = next(e for e in range(self.start_from_epoch + 1, self.start_from_epoch + 3)
                     if is_candidate(e, self.select_at))
        if first > self.max_epochs:
            raise ValueError(f"train.start_from_epoch = {self.start_from_epoch} leaves no epoch to "
                             f"select within train.max_epochs = {self.max_epochs} "
                             f"(train.select_at = {self.select_at}: the first candidate is epoch {first})")
        return self


Conv = Literal["plain", "ff", "dilated", "mdcb"]


class ModelRow(Strict):
    """The `model` keys an ablation row overrides; `head` is required (it picks the
    `softmax` or `arcface` section the row's DVC stages depend on)."""

    filters: PositiveInt | None = None
    conv: Conv | None = None
    merge: Literal["sum", "concat"] | None = None
    norm: Literal["none", "batch"] | None = None
    pooling: Literal["gmp", "spp"] | None = None
    spp_levels: Annotated[list[PositiveInt], Field(min_length=1)] | None = None
    attention: bool | None = None
    attention_units: PositiveInt | None = None
    fc_units: PositiveInt | None = None
    head: Literal["softmax", "arcface"]


class Model(ModelRow):
    filters: PositiveInt
    conv: Conv
    merge: Literal["sum", "concat"]
    norm: Literal["none", "batch"]
    pooling: Literal["gmp", "spp"]
    spp_levels: Annotated[list[PositiveInt], Field(min_length=1)]
    attention: bool
    attention_units: PositiveInt
    fc_units: PositiveInt
    head: Literal["softmax", "arcface"]


class Softmax(Strict):
    label_smoothing: Annotated[float, Field(ge=0, lt=1)]


class Arcface(Strict):
    m: Annotated[float, Field(ge=0, lt=math.pi, description="additive angular margin, in [0, pi)")]
    s: PositiveFloat
    margin_warmup: Annotated[float, Field(ge=0, description="epochs over which the margin grows from 0 to m")]


class Baseline(Strict):
    """Logistic regression on per-utterance log-mel statistics: the floor of every table.
    Its inverse regularisation strength is picked from `C` on the validation speaker."""

    C: Annotated[list[PositiveFloat], Field(min_length=1)]
    max_iter: PositiveInt


class Runtime(Strict):
    """How the work is spread over this machine; never changes a result, so no stage
    depends on it."""

    workers: Annotated[int, Field(
        ge=0, description="folds trained at once, each in its own process on one core; 0 = one per core")]


class Ablation(Strict):
    rows: Annotated[dict[str, ModelRow], Field(min_length=1)]
    # each ablation step: the row -> the row it modifies, compared on the same test speakers
    steps: dict[str, str]
    confidence: Annotated[float, Field(gt=0, lt=1)]

    @field_validator("rows")
    @classmethod
    def _names(cls, rows: dict[str, ModelRow]) -> dict[str, ModelRow]:
        for name in rows:
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"row name {name!r} may hold only letters, digits, '-' and '_'")
        return rows

    @model_validator(mode="after")
    def _steps_name_rows(self) -> Ablation:
        for row, base in self.steps.items():
            for name in (row, base):
                if name not in self.rows and name != "baseline":
                    raise ValueError(
                        f"ablation.steps: {name!r} ({row} vs {base}) is not a row of ablation.rows")
        return self


class PaperFigure(Strict):
    iemocap: float | None = None
    emodb: float | None = None


class Tables(Strict):
    table1: dict[str, PaperFigure]
    table3: dict[str, PaperFigure]


class Mlflow(Strict):
    experiment_prefix: str


class Params(Strict):
    data: Data
    audio: Audio
    features: Features
    split: Split
    train: Train
    model: Model
    softmax: Softmax
    arcface: Arcface
    baseline: Baseline
    ablation: Ablation
    tables: Tables
    mlflow: Mlflow
    runtime: Runtime

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        speakers = self.data.synth.speakers if self.data.corpus == "synth" else 10  # EMODB, IEMOCAP
        if self.train.folds > speakers:
            raise ValueError(
                f"train.folds = {self.train.folds}: at most {speakers}, one fold per speaker of "
                f"data.corpus {self.data.corpus!r}"
            )
        freq = self.features.n_mels // 2  # the map SPP sees: n_mels halved by the first pooling
        for name, row in {"model": self.model, **self.ablation.rows}.items():
            levels = row.spp_levels or self.model.spp_levels
            if max(levels) > freq:
                key = "model" if name == "model" else f"ablation.rows.{name}"
                raise ValueError(
                    f"{key}.spp_levels = {levels}: a level may not exceed {freq}, the "
                    f"frequency size of the feature map (features.n_mels / 2)"
                )
        return self


def _format(error: ValidationError, path: Path) -> str:
    lines = [f"{path}: {error.error_count()} invalid parameter(s)"]
    for e in error.errors():
        key = ".".join(str(p) for p in e["loc"])
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {key or '(top level)'}{shown}: {msg}")
    return "\n".join(lines)


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read `params.yaml` with the safe loader and validate it; return plain dicts."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found (run from the repository root)") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    try:
        return Params.model_validate(raw).model_dump()
    except ValidationError as exc:
        raise UserError(_format(exc, path)) from None


def row_model(params: dict[str, Any], row: str) -> dict[str, Any]:
    """The model parameters of one ablation row: the row's keys over `model`."""
    rows = params["ablation"]["rows"]
    if row not in rows:
        raise UserError(f"ablation row {row!r} is not in params.yaml ablation.rows ({sorted(rows)})")
    overrides = {k: v for k, v in rows[row].items() if v is not None}
    return {**params["model"], **overrides}
