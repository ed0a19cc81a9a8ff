"""The built models: padding changes nothing, receptive fields, every ablation row builds."""

import runpy
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

from mdser.model import (
    attention_weights,
    build_model,
    compact_summary,
    dilation_schedule,
    receptive_field,
    stack_receptive_field,
)
from mdser.model.builder import conv_stack

PARAMS = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
SMALL = {**PARAMS["model"], "filters": 4, "attention_units": 8, "fc_units": 8}
LENGTHS = [23, 57, 100]  # 23 is odd: its last frame is dropped by the 2x2 pooling


def mixed_batch(lengths=LENGTHS, n_mels=40, seed=0):
    rng = np.random.default_rng(seed)
    x = np.zeros((len(lengths), n_mels, max(lengths), 3), np.float32)
    for b, n in enumerate(lengths):
        x[b, :, :n] = rng.normal(size=(n_mels, n, 3))
    return x, np.array(lengths, np.int32)


def run(model, x, lengths):
    return np.asarray(model({"features": x, "lengths": lengths}))


def assert_padding_changes_nothing(model, seed=0):
    x, lengths = mixed_batch(seed=seed)
    batched = run(model, x, lengths)
    assert batched.dtype == np.float32 and np.isfinite(batched).all()
    for b, n in enumerate(LENGTHS):
        alone = run(model, x[b:b + 1, :, :n], lengths[b:b + 1])
        np.testing.assert_allclose(batched[b:b + 1], alone, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- masked equality

POOLINGS = {"gmp": {"pooling": "gmp"},
            "spp1-5-10": {"pooling": "spp", "spp_levels": [1, 5, 10]},
            "spp1-2-5-8-10": {"pooling": "spp", "spp_levels": [1, 2, 5, 8, 10]}}


@pytest.mark.parametrize("head", ["softmax", "arcface"])
@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("pooling", list(POOLINGS))
@pytest.mark.parametrize("conv", ["plain", "ff", "dilated", "mdcb"])
def test_padded_batch_equals_each_utterance_alone(conv, pooling, attention, head):
    keras.utils.set_random_seed(0)
    cfg = {**SMALL, "conv": conv, **POOLINGS[pooling], "attention": attention, "head": head}
    assert_padding_changes_nothing(build_model(cfg, n_classes=4))


def test_padded_batch_equals_alone_with_concat_merge():
    keras.utils.set_random_seed(0)
    cfg = {**SMALL, "conv": "mdcb", "merge": "concat", "pooling": "spp", "attention": True}
    model = build_model(cfg, n_classes=4)
    assert model.get_layer("layer2_concat").output.shape[-1] == 8
    assert_padding_changes_nothing(model)


@pytest.mark.parametrize("conv", ["plain", "mdcb"])
def test_padded_batch_equals_alone_with_batch_normalisation(conv):
    """model.norm: batch, after training-mode passes have moved the moving statistics."""
    keras.utils.set_random_seed(0)
    cfg = {**SMALL, "conv": conv, "norm": "batch", "pooling": "spp", "attention": True}
    model = build_model(cfg, n_classes=4)
    x, lengths = mixed_batch()
    for _ in range(3):
        model({"features": x * 3 + 1, "lengths": lengths}, training=True)
    moving = model.get_layer("layer1_5x3_bn" if conv == "plain" else "layer1_5x1_bn").moving_mean
    assert np.abs(np.asarray(moving)).max() > 0  # the statistics did move
    assert_padding_changes_nothing(model)


def test_attention_weights_sum_to_one_per_utterance():
    keras.utils.set_random_seed(0)
    model = build_model({**SMALL, "conv": "mdcb", "pooling": "spp", "attention": True}, 4)
    x, lengths = mixed_batch()
    alpha = np.asarray(attention_weights(model)({"features": x, "lengths": lengths}))
    assert alpha.shape == (3, 1 + 25 + 100)
    assert (alpha > 0).all()
    np.testing.assert_allclose(alpha.sum(axis=1), 1.0, atol=1e-6)


# ----------------------------------------------------------------------------- receptive field


def test_paper_claim_dilations_123_reach_the_field_of_222():
    assert receptive_field(3, [1, 2, 3]) == receptive_field(3, [2, 2, 2]) == 13
    assert receptive_field(5, [1, 2, 3]) == receptive_field(5, [2, 2, 2]) == 25


def test_dilation_schedules():
    assert dilation_schedule("plain") == dilation_schedule("ff") == [(1,)] * 7
    assert dilation_schedule("dilated") == [(2,)] * 7
    assert dilation_schedule("mdcb") == [(1, 2), (2,), (3, 2), (1, 2), (2,), (3, 2), (1, 2)]
    with pytest.raises(ValueError):
        dilation_schedule("resnet")


@pytest.mark.parametrize("conv", ["plain", "ff", "dilated", "mdcb"])
def test_built_stack_time_receptive_field_equals_eq7(conv):
    """Impulse response of layers 2-8 with positive kernels and zero biases: no cancellation,
    so the frames that respond are exactly the frames within reach of the impulse."""
    inputs = keras.Input((20, None, 2))
    lengths = keras.Input((), dtype="int32")
    stack = keras.Model([inputs, lengths], conv_stack(inputs, lengths, conv, 2, "sum", "none"))
    for layer in stack.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel, bias = layer.get_weights()
            layer.set_weights([np.full_like(kernel, 0.1), np.zeros_like(bias)])
    n_frames, centre = 81, 40
    x = np.zeros((1, 20, n_frames, 2), np.float32)
    x[0, 10, centre, :] = 1.0
    y = np.asarray(stack([x, np.array([n_frames], np.int32)]))
    reached = np.flatnonzero(y[0].max(axis=(0, 2)) > 0) - centre
    rf = stack_receptive_field(conv)
    assert reached.max() - reached.min() + 1 == rf
    assert reached.min() == -(rf - 1) // 2
    want_rf = {"plain": 15, "ff": 15, "dilated": 29, "mdcb": 33}[conv]
    assert rf == want_rf
    if conv == "dilated":  # the gridding effect (paper Fig. 1): odd offsets are never reached
        assert (reached % 2 == 0).all() and len(reached) == (rf + 1) // 2
    else:  # every frame within the field is reached
        assert len(reached) == rf


# ----------------------------------------------------------------------------- ablation rows


@pytest.mark.parametrize("row", list(PARAMS["ablation"]["rows"]))
def test_every_ablation_row_builds_from_parameters(row):
    cfg = {**PARAMS["model"], **PARAMS["ablation"]["rows"][row]}
    model = build_model(cfg, n_classes=4)
    assert model.output.shape == (None, 4)
    levels = cfg["spp_levels"] if cfg["pooling"] == "spp" else [1]
    want_in = sum(n * n for n in levels) * cfg["filters"]
    assert model.get_layer("fc").input.shape[-1] == want_in
    assert ("attention" in [layer.name for layer in model.layers]) == cfg["attention"]
    assert model.layers[-1].name == {"softmax": "logits", "arcface": "cosine"}[cfg["head"]]


def test_paper_profile_builds():
    cfg = {**PARAMS["model"], "filters": 128, "conv": "mdcb", "pooling": "spp",
           "spp_levels": [1, 5, 10], "attention": True, "head": "arcface"}
    model = build_model(cfg, n_classes=4)
    print(f"\npaper profile: {model.count_params():,} parameters")
    print("\n".join(compact_summary(model)))
    assert model.get_layer("fc").input.shape[-1] == 126 * 128
    assert model.get_layer("cosine").get_weights()[0].shape == (32, 4)


# ----------------------------------------------------------------------------- runtime


FULL = {**SMALL, "conv": "mdcb", "pooling": "spp", "attention": True, "head": "arcface"}


def test_same_seed_same_model():
    outputs = []
    for _ in range(2):
        keras.utils.set_random_seed(7)
        outputs.append(run(build_model(FULL, 4), *mixed_batch()))
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_xla_matches_eager_and_trains_under_op_determinism():
    keras.utils.set_random_seed(0)
    model = build_model({**FULL, "conv": "dilated", "spp_levels": [1, 2]}, 4)  # fast to compile
    x, lengths = mixed_batch()
    labels = np.array([0, 1, 2])

    @tf.function(jit_compile=True)
    def step(features, n):
        with tf.GradientTape() as tape:
            out = model({"features": features, "lengths": n}, training=True)
            loss = tf.reduce_mean(tf.square(out - tf.one_hot(labels, 4)))
        return out, tape.gradient(loss, model.trainable_variables)

    # TensorFlow's MaxPool gradient fails here (no deterministic XLA kernel): the model must
    # not use it. Op determinism has no public switch-off, hence the private module.
    from tensorflow.python.framework import config as tf_config

    was_enabled = tf_config.is_op_determinism_enabled()
    tf_config.enable_op_determinism()
    try:
        out, grads = step(x, lengths)
        _, grads_again = step(x, lengths)
    finally:
        if not was_enabled:
            tf_config.disable_op_determinism()
    np.testing.assert_allclose(np.asarray(out), run(model, x, lengths), rtol=1e-5, atol=1e-5)
    for g, h in zip(grads, grads_again, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(h))


def test_save_and_load_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    model = build_model(FULL, 4)
    x, lengths = mixed_batch()
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(run(loaded, x, lengths), run(model, x, lengths))


@pytest.mark.parametrize("head", ["softmax", "arcface"])
def test_mixed_float16_outputs_float32(head):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = build_model({**FULL, "head": head}, 4)
        assert model.get_layer("layer2_d1_5x1").compute_dtype == "float16"
        x, lengths = mixed_batch()
        batched = run(model, x, lengths)
        assert batched.dtype == np.float32 and np.isfinite(batched).all()
        alone = run(model, x[:1, :, :LENGTHS[0]], lengths[:1])
        np.testing.assert_allclose(batched[:1], alone, rtol=1e-2, atol=1e-2)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_the_summary_command_prints_each_row_with_its_parameter_count():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mdser.model", "--filters", "4", "--classes", "7",
                          "cnn-gmp-softmax"], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = {**PARAMS["model"], **PARAMS["ablation"]["rows"]["cnn-gmp-softmax"], "filters": 4}
    count = build_model(cfg, n_classes=7).count_params()
    assert f"cnn-gmp-softmax (4 filters, 7 classes): {count:,} parameters" in out.stdout
    assert "layer8" in out.stdout and "gmp" in out.stdout


def test_the_summary_command_names_an_unknown_row_without_a_traceback(monkeypatch, capsys):
    monkeypatch.chdir(Path(__file__).parents[1])
    monkeypatch.setattr(sys, "argv", ["mdser.model", "no-such-row"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("mdser.model", run_name="__main__")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error: ablation row 'no-such-row' is not in params.yaml" in err and "Traceback" not in err
