"""params.yaml: the schema rejects bad values with one message naming the key."""

import copy
from pathlib import Path

import pytest
import yaml

from mdser.errors import UserError
from mdser.params import load_params, row_model

ROOT = Path(__file__).resolve().parents[1]
GOOD = yaml.safe_load((ROOT / "params.yaml").read_text())


def row(p: dict, name: str = "ff-spp-softmax") -> dict:
    return p["ablation"]["rows"][name]


def write(tmp_path, mutate):
    p = copy.deepcopy(GOOD)
    mutate(p)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def test_the_repository_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    for row in params["ablation"]["rows"]:
        assert row_model(params, row)["head"] in ("softmax", "arcface")


BAD = [
    ("unknown key", lambda p: p["train"].update(max_epoch=3), "train.max_epoch"),
    ("wrong type", lambda p: p["train"].update(max_epochs="many"), "train.max_epochs"),
    ("selection after the cap", lambda p: p["train"].update(start_from_epoch=25), "train.start_from_epoch"),
    ("no cycle end before the cap", lambda p: p["train"].update(start_from_epoch=24),
     "first candidate is epoch 26"),
    ("patience 1 at cycle ends", lambda p: p["train"].update(patience=1), "train.patience"),
    ("unknown selection", lambda p: p["train"].update(select_at="cycle"), "train.select_at"),
    ("unknown standardisation", lambda p: p["train"].update(standardize="utterance"), "train.standardize"),
    ("unknown norm", lambda p: p["model"].update(norm="layer"), "model.norm"),
    ("margin >= pi", lambda p: p["arcface"].update(m=3.5), "arcface.m"),
    ("negative margin", lambda p: p["arcface"].update(m=-0.1), "arcface.m"),
    ("scale <= 0", lambda p: p["arcface"].update(s=0), "arcface.s"),
    ("spp level too fine", lambda p: p["model"].update(spp_levels=[1, 40]), "spp_levels"),
    ("spp level 0", lambda p: p["model"].update(spp_levels=[0, 5]), "model.spp_levels"),
    ("no spp level", lambda p: p["model"].update(spp_levels=[]), "model.spp_levels"),
    ("unknown head", lambda p: row(p).update(head="cosface"), "head"),
    ("synth utterances", lambda p: p["data"]["synth"].update(utterances=3), "data.synth.utterances"),
    ("synth layout", lambda p: p["data"]["synth"].update(layout="ravdess"), "data.synth.layout"),
    ("too many synth speakers", lambda p: p["data"]["synth"].update(speakers=91), "data.synth.speakers"),
    ("synth sample rate", lambda p: p["data"]["synth"].update(sample_rate=192000),
     "data.synth.sample_rate"),
    ("iemocap layout speakers", lambda p: p["data"]["synth"].update(layout="iemocap", speakers=8),
     "data.synth.speakers"),
    ("row spp level too fine", lambda p: row(p).update(spp_levels=[25]),
     "ablation.rows.ff-spp-softmax.spp_levels"),
    ("empty class set", lambda p: p["data"]["iemocap"].update(classes=[]), "data.iemocap.classes"),
    ("unknown corpus", lambda p: p["data"].update(corpus="ravdess"), "data.corpus"),
    ("iemocap root missing", lambda p: p["data"].update(corpus="iemocap"), "data.iemocap.root"),
    ("emodb root missing", lambda p: p["data"].update(corpus="emodb", emodb={**p["data"]["emodb"],
     "root": "/nonexistent/emodb"}), "data.emodb.root"),
    ("bad sha256", lambda p: p["data"]["emodb"].update(sha256="xyz"), "data.emodb.sha256"),
    ("lr range", lambda p: p["train"].update(lr_min=1.0, lr_max=0.1), "lr_min"),
    ("unknown conv", lambda p: p["model"].update(conv="resnet"), "model.conv"),
    ("row without head", lambda p: row(p).pop("head"), "head"),
    ("misspelt row key", lambda p: row(p).update(pooling_="spp"), "pooling_"),
]


@pytest.mark.parametrize("name,mutate,key", BAD, ids=[b[0] for b in BAD])
def test_bad_parameters_name_the_key(tmp_path, name, mutate, key):
    with pytest.raises(UserError) as err:
        load_params(write(tmp_path, mutate))
    assert key in str(err.value)
    assert "Traceback" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_params(bad)
