"""The benchmark's pieces on toy sizes: result structure only, never timing."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest

from mdser.bench import ROOT
from mdser.bench.data import synthetic_lengths
from mdser.bench.flops import model_flops
from mdser.bench.folds import fold_throughput, median_round, tensorflow_onednn_default
from mdser.bench.gpu import project_ablation
from mdser.bench.kernels import conv_flop, conv_kernels, dilated, kernel_profile
from mdser.bench.machine import PeakMemory, machine_info, matmul_peak
from mdser.bench.pipeline import STAGE_LINE
from mdser.bench.report import TARGETS, batching_bounds, verdicts, write_report
from mdser.bench.training import sweep_in_fold_process, training_profile
from mdser.params import load_params


@pytest.fixture(scope="module")
def params():
    p = load_params(ROOT / "params.yaml")
    p["model"] |= {"filters": 2, "attention_units": 2, "fc_units": 4}
    return p


def tiny(params, row):
    from mdser.params import row_model

    return row_model(params, row)


def test_synthetic_lengths_follow_the_iemocap_like_range():
    lengths = synthetic_lengths(2000, np.random.default_rng(0))
    assert lengths.min() >= 60 and lengths.max() <= 3000
    assert 400 < lengths.mean() < 500  # mean about 4.5 s at 100 frames/s


def test_flops_are_counted_from_the_conv_shapes(params):
    from mdser.model import build_model

    model = build_model(tiny(params, "cnn-gmp-softmax"), 4, n_mels=40)
    f = model_flops(model)
    # layer 1: 40 bands x 5x3 x 3 -> 2; layers 2-8: 20 bands x half the frames x 5x3 x 2 -> 2
    macs = 40 * 15 * 3 * 2 + 7 * 20 * 0.5 * 15 * 2 * 2
    assert f["conv_layers"] == 8
    assert f["fwd_flop_per_frame"] == pytest.approx(2 * macs)
    assert f["train_flop_per_frame"] == pytest.approx(6 * macs)
    assert f["fwd_flop_per_utt"] > 0


@pytest.mark.parametrize("row", ["cnn-gmp-softmax", "mdcnn-ff-spp-att-arcface"])
def test_training_profile_structure_and_masked_equality(params, row):
    res = training_profile(row, tiny(params, row), params, n_utts=5, n_naive=2, n_equal=3,
                                 batch_frames=1500)
    for key in ("bucketed", "one_per_batch", "bucketed_same_utterances"):
        run = res[key]
        assert run["utterances"] > 0 and run["wall_s"] > 0 and run["loss_finite"]
        assert run["padded_frames"] >= run["real_frames"] > 0
        assert run["executed_flops"] >= run["useful_flops"] > 0
    assert res["bucketed"]["utterances"] == 5 and res["one_per_batch"]["batches"] == 2
    assert res["speedup_vs_one_per_batch"] > 0
    assert res["equality"]["utterances"] == 3
    assert res["equality"]["max_abs_diff"] <= TARGETS["equality_atol"]


@pytest.fixture(scope="module")
def folds():
    """Every way of training folds, each in its own interpreter, 2 epochs on 2 folds of 4
    utterances (one per class)."""
    return fold_throughput(4, 2, 2, workers=1)


@pytest.mark.slow  # three fresh TensorFlow processes
def test_fold_epochs_run_each_way_in_a_fresh_process(folds):
    import os

    ref, one, par = folds["reference"], folds["sequential"], folds["processes"]
    assert ref["workers"] == one["workers"] == 1 and par["workers"] == min(2, os.cpu_count())
    assert folds["default"] == "sequential"  # runtime.workers = 1
    for run in (ref, one, par):
        assert run["utterances"] == 16 and run["folds"] == 2 and run["epochs"] == 2
        assert run["utt_per_s"] > 0 and run["wall_s"] > 0
        assert 0 < run["cpu_utilisation"] <= 1.05  # CPU time cannot exceed wall x cores
        assert run["useful_flops"] == pytest.approx(run["useful_flop"] / run["wall_s"])
        assert run["useful_flop"] > 0
    assert folds["speedup"] == pytest.approx(one["utt_per_s"] / ref["utt_per_s"])
    # the reference keeps TensorFlow's own kernel choice; the library's way has oneDNN
    assert ref["onednn"] == (tensorflow_onednn_default() == "1")
    assert one["onednn"] and par["onednn"]


def test_median_round_is_the_middle_ratio_or_the_lower_middle():
    assert median_round([2.5]) == 0
    assert median_round([2.95, 2.35, 2.51]) == 2
    assert median_round([3.1, 2.2, 2.9, 2.4]) == 3  # 2.4, the lower middle of 2.2, 2.4, 2.9, 3.1


def test_tensorflow_onednn_default_is_what_tensorflow_chooses_by_itself():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    code = "from tensorflow.python.util import _pywrap_util_port as p; print(int(p.IsMklEnabled()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == tensorflow_onednn_default()


def fold_run(mode: str, workers: int, utt_per_s: float) -> dict:
    """A `fold_epochs` result of that shape (the report's formatting only)."""
    return {"mode": mode, "workers": workers, "folds": 2, "epochs": 1, "utterances": 8,
            "wall_s": 8 / utt_per_s,
            "utt_per_s": utt_per_s, "cpu_s": 1.0, "cpu_utilisation": 0.8, "cores": 2,
            "useful_flop": 1e9 * utt_per_s, "useful_flops": 1e9 * utt_per_s / (8 / utt_per_s)}


# oneDNN's log lines as it writes them (TensorFlow 2.21, oneDNN 3.7): a creation, two
# executed convolutions of different kinds, and an executed reorder that is no convolution
ONEDNN_LOG = [
    "onednn_verbose,v1,primitive,create:cache_miss,cpu,convolution,jit:avx512_core,"
    "backward_weights,src:f32::blocked:acdb::f0,,alg:convolution_direct,"
    "mb5_ic8oc8_ih40oh40kh1sh1dh0ph0_iw272ow272kw3sw1dw0pw1,0.9",
    "onednn_verbose,v1,primitive,exec,cpu,convolution,jit:avx512_core,backward_weights,"
    "src:f32::blocked:acdb::f0 wei:f32:ap:blocked:Acdb16a::f0 bia:f32::blocked:a::f0 "
    "dst:f32::blocked:acdb::f0,,alg:convolution_direct,"
    "mb5_ic8oc8_ih40oh40kh1sh1dh0ph0_iw272ow272kw3sw1dw0pw1,0.62207",
    "onednn_verbose,v1,primitive,exec,cpu,convolution,brg_conv_fwd:avx512_core,"
    "forward_training,src:f32::blocked:acdb::f0 wei:f32:ap:blocked:AcdB16b16a::f0 "
    "bia:f32::blocked:a::f0 dst:f32::blocked:acdb::f0,attr-post-ops:eltwise_relu:0.3,"
    "alg:convolution_direct,g2mb3_ic8oc4_ih20oh20kh5sh1dh1ph4_iw50ow50kw1sw1dw0pw0,0.25",
    "onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,src:f32::blocked:abcd::f0 "
    "dst:f32::blocked:Acdb16a::f0,,,8x8x5x1,0.002",
]


def test_conv_flop_is_two_macs_per_output_and_kernel_tap():
    assert conv_flop("mb5_ic8oc8_ih40oh40kh1sh1dh0ph0_iw272ow272kw3sw1dw0pw1") == 2 * 5 * 8 * 8 * 40 * 272 * 3
    # grouped: each output channel reads ic / g input channels
    assert conv_flop("g2mb3_ic8oc4_ih20oh20kh5sh1dh1ph4_iw50ow50kw1sw1dw0pw0") == 2 * 3 * 4 * 4 * 20 * 50 * 5


def test_conv_kernels_sum_the_executed_convolutions_by_kind():
    kinds = conv_kernels(ONEDNN_LOG)
    assert set(kinds) == {"backward_weights", "forward_training"}  # no creation, no reorder
    weights = {"flop": 2.0 * 5 * 8 * 8 * 40 * 272 * 3, "s": 0.62207e-3, "calls": 1}
    assert kinds["backward_weights"] == weights | {"implementations": {"jit:avx512_core": weights}}
    assert kinds["forward_training"]["calls"] == 1
    assert kinds["forward_training"]["s"] == pytest.approx(0.25e-3)
    # dh1: dilation 2 along frequency, as oneDNN writes it (rate - 1)
    assert list(kinds["forward_training"]["implementations"]) == ["brg_conv_fwd:avx512_core dilated"]


def test_dilated_reads_onednn_rate_minus_one():
    assert not dilated("mb5_ic8oc8_ih40oh40kh1sh1dh0ph0_iw272ow272kw3sw1dw0pw1")
    assert dilated("mb1_ic16oc16_ih20oh20kh5sh1dh1ph4_iw9ow9kw1sw1dw0pw0")
    assert dilated("mb1_ic16oc16_ih20oh20kh1sh1dh0ph0_iw9ow9kw3sw1dw2pw3")


@pytest.mark.slow  # two fresh TensorFlow processes
def test_kernel_profile_reads_onednn_log_of_the_real_step():
    k = kernel_profile(8)
    assert set(k["conv_kinds"]) == {"forward_training", "backward_data", "backward_weights"}
    assert k["conv_kinds"]["forward_training"]["calls"] >= 26 * k["batches"] > 0  # 26 convs
    # the default profile's MDCB stack has dilated convolutions in every kind, each split out
    for kind in k["conv_kinds"].values():
        assert any(name.endswith(" dilated") for name in kind["implementations"])
        assert sum(p["calls"] for p in kind["implementations"].values()) == kind["calls"]
    # ratios of timings taken in separate runs: positive, but no bound (a busy machine can put
    # the kernels' share or fraction of the peak above 1: 1.36 once, with another test running)
    assert k["conv_share_of_step"] > 0 and k["conv_fraction_of_peak"] > 0
    assert k["step_useful_flops"] > 0 and k["one_core_peak"] > 0


@pytest.mark.slow  # a fresh TensorFlow process
def test_batch_budget_sweep_runs_as_a_fold_process_trains():
    sweep = sweep_in_fold_process(6, [1, 900])
    assert sweep["intra_op_threads"] == sweep["inter_op_threads"] == 1
    assert sweep["budgets"]["1"]["mean_batch_size"] == 1.0
    assert sweep["budgets"]["900"]["mean_batch_size"] > 1
    assert all(v["utt_per_s"] > 0 for v in sweep["budgets"].values())


def test_report_and_json_from_toy_results(params, tmp_path):
    folds = {"reference": fold_run("reference", 1, 10.0), "sequential": fold_run("sequential", 1, 12.0),
             "processes": fold_run("processes", 2, 11.0), "default": "processes", "speedup": 1.1,
             "speedups": [1.3, 1.1, 0.9]}
    row = "cnn-gmp-softmax"
    results = {
        "quick": True, "date": "today", "wall_s": 1.0, "machine": machine_info(),
        "matmul_peak": matmul_peak(n=128, repeats=1),
        "training": {"plain": training_profile(row, tiny(params, row), params, 4, 1, 2, 900)},
        "gpu": {"present": False, "note": "no GPU present"},
        "folds": folds,
        "kernels": {"utterances": 8, "batches": 2, "step_wall_s": 1.0, "step_useful_flops": 2e9,
                    "one_core_peak": 1e10, "conv_kinds": conv_kernels(ONEDNN_LOG),
                    "conv_s": 0.5, "conv_flops": 4e9, "conv_share_of_step": 0.5,
                    "conv_fraction_of_peak": 0.4, "step_fraction_of_peak": 0.2},
        "batch_budget_sweep": {"utterances": 6, "configuration": "fold process (one thread per op)",
                               "budgets": {"1": {"mean_batch_size": 1.0, "utt_per_s": 5.0,
                                                 "useful_flops": 1e9, "padding_overhead": 0.0}}},
    }
    results["projection"] = project_ablation(params, tiny(params, row), 1e9, epochs=1)
    results["projection"]["device"] = "cpu"
    assert set(results["projection"]["per_row_s"]) == set(params["ablation"]["rows"])
    assert results["projection"]["total_s"] > 0
    assert results["machine"]["cores"] >= 1 and results["machine"]["tensorflow"]
    report = tmp_path / "report.md"
    write_report(results, report)
    text = report.read_text()
    assert "## Targets" in text and "No GPU present" in text
    assert "## Fold-epoch throughput" in text and "Both cores busy" in text
    assert "## Where the default step's time goes" in text and "| all | 2 |" in text
    assert "1.10× (median of 3 rounds: 0.90–1.30×)" in text
    assert "`jit:avx512_core` | 1 |" in text  # the kernel table by implementation
    assert "in a fold process (one thread per op)" in text and "| 1 | 1.0 | 5.00 |" in text
    rows = verdicts(results)
    assert all(len(v) == 4 for v in rows)
    # the default profile's share of the peak is the way `train_row` trains it (processes)
    peak_row = next(v for v in rows if v[0].startswith("Default-profile training"))
    assert peak_row[2].startswith(
        f"{100 * folds['processes']['useful_flops'] / results['matmul_peak']['flops']:.1f} %")
    json.dumps(results, default=str)  # serializable


def test_dvc_stage_lines_are_recognized():
    m = STAGE_LINE.search("Running stage 'train@cnn-gmp-softmax':")
    assert m and m.group(1) == "train@cnn-gmp-softmax"


def test_peak_memory_sees_this_process():
    with PeakMemory(interval=0.01) as mem:
        np.ones(1 << 20).sum()
    assert mem.peak_rss > 0 and mem.peak_pss > 0


def test_batching_bounds_are_the_peak_ratio_and_the_fixed_cost_share():
    profile = {"one_per_batch_step_s": 0.036, "step_overhead_s": 0.009,
               "one_per_batch": {"useful_flops": 5e9}}
    bounds = batching_bounds(profile, peak=80e9)
    assert bounds["peak_bound"] == pytest.approx(16.0)
    assert bounds["fixed_share"] == pytest.approx(0.25)


def test_reference_layers_compute_what_the_library_layers_compute(params):
    """The reference path is the same model by its earlier ops, so its speed compares fairly."""
    import keras
    import tensorflow as tf

    from mdser.bench.reference import reference_layers
    from mdser.model import build_model, builder
    from mdser.params import row_model

    model_params = row_model(params, "mdcnn-ff-spp-att-arcface")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 40, 60, 3)).astype(np.float32)
    lengths = np.array([60, 31, 9], np.int32)
    outputs, grads, kinds = [], [], []
    for context in (reference_layers, contextlib.nullcontext):
        keras.utils.set_random_seed(0)
        with context():
            model = build_model(model_params, 4)
        kinds.append({type(layer).__module__ for layer in model.layers})
        with tf.GradientTape() as tape:
            out = model({"features": x, "lengths": lengths})
            loss = tf.reduce_sum(out * out)
        outputs.append(np.asarray(out))
        grads.append([np.asarray(g) for g in tape.gradient(loss, model.trainable_variables)])
    assert "mdser.bench.reference" in kinds[0] and "mdser.bench.reference" not in kinds[1]
    assert builder.Conv2D.__module__ == "mdser.model.layers"  # swapped back
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    for g, h in zip(*grads, strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5)
