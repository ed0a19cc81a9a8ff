"""Where the default profile's training step spends its time: oneDNN's convolution kernels.

The job runs in a fresh interpreter with one thread per op, as a fold process trains
(`row_training.start_fold_process`, `runtime.configure`): the one-thread float32 matmul
peak, then two passes (a warm-up that creates every batch shape's kernels, then the
measured one) of the default profile's train step over IEMOCAP-like length-bucketed
batches. `kernel_profile` runs it twice: once plainly, for the step's wall time, and once
with `ONEDNN_VERBOSE=1` (read when oneDNN starts), which logs every convolution primitive
oneDNN executes with its problem size and time. From the measured pass's log follow the
convolution kernels' FLOP/s (2 x MACs for each forward, backward-data and backward-weights
primitive) and their share of the step's wall time: a ceiling on how close to one core's
peak this step can come with every other op for free.

    python -m mdser.bench.kernels UTTERANCES
"""

from __future__ import annotations

import ctypes
import re
import sys
import time
from typing import Any

from mdser.bench import ROOT, print_result, read_result, run_job

# onednn_verbose,v1,primitive,exec,cpu,convolution,<impl>,<prop>,...,mb5_ic8oc8_ih40...,0.62
CONV_EXEC = re.compile(r"^onednn_verbose,.*,exec,cpu,convolution,([^,]*),([a-z_]+),.*,(\w+),([\d.]+)$")


def conv_flop(problem: str) -> float:
    """2 x MACs of one convolution primitive from oneDNN's problem descriptor
    (e.g. ``mb5_ic8oc8_ih40oh40kh5sh1dh0ph2_iw272ow272kw1sw1dw0pw0``)."""
    size = {k: int(v) for k, v in re.findall(r"([a-z]+)(\d+)", problem)}
    macs = size["mb"] * size["ic"] // size.get("g", 1) * size["oc"]
    for out, kernel in (("od", "kd"), ("oh", "kh"), ("ow", "kw")):
        macs *= size.get(out, 1) * size.get(kernel, 1)
    return 2.0 * macs


def dilated(problem: str) -> bool:
    """Whether a convolution primitive's descriptor has a dilation (oneDNN writes rate - 1)."""
    return any(int(d) > 0 for d in re.findall(r"d[dhw](\d+)", problem))


def conv_kernels(log_lines: list[str]) -> dict[str, dict[str, Any]]:
    """FLOP, seconds and calls of the logged convolution primitives, per propagation kind,
    and within each kind per implementation (oneDNN's name for the kernel it chose, with
    " dilated" added for dilated problems): where an instruction set lacks a kernel, oneDNN
    falls back to a slower one (on AVX2, ``gemm:jit`` for a dilated weight gradient)."""
    kinds: dict[str, dict[str, Any]] = {}
    for line in log_lines:
        m = CONV_EXEC.match(line.strip())
        if m:
            impl, prop, problem, ms = m.groups()
            kind = kinds.setdefault(prop, {"flop": 0.0, "s": 0.0, "calls": 0, "implementations": {}})
            name = f"{impl} dilated" if dilated(problem) else impl
            part = kind["implementations"].setdefault(name, {"flop": 0.0, "s": 0.0, "calls": 0})
            for totals in (kind, part):
                totals["flop"] += conv_flop(problem)
                totals["s"] += float(ms) / 1000.0
                totals["calls"] += 1
    return kinds


def train_passes(n_utts: int) -> dict[str, Any]:
    """The job: one-thread matmul peak, then a warm-up and a measured pass of the default
    profile's train step (in this process)."""
    import numpy as np

    from mdser.batching import length_batches
    from mdser.bench.data import IEMOCAP, no_standardization, synthetic_set
    from mdser.bench.machine import matmul_peak
    from mdser.bench.training import Trainer, profiles
    from mdser.params import load_params
    from mdser.row_training import start_fold_process
    from mdser.training import class_weights, frozen_heap

    params = load_params(ROOT / "params.yaml")
    model_params, train = profiles(params)["default"], params["train"]
    start_fold_process(None)
    n_classes, n_mels = IEMOCAP["classes"], params["features"]["n_mels"]
    trainer = Trainer(model_params, train, params[model_params["head"]], n_classes, n_mels)
    peak = matmul_peak(2048, 3)  # one thread per op from here on (`configure`)
    lengths, frames, rows, labels = synthetic_set(n_utts, n_mels, n_classes)
    weights = class_weights(labels, n_classes, train["class_weight_alpha"]).astype(np.float32)
    groups = length_batches(lengths, train["batch_frames"], np.random.default_rng(0))
    mean, std = no_standardization()
    trainer.run(frames, rows, labels, weights, groups, mean, std)  # every shape's kernels
    with frozen_heap():  # as `train_row` trains
        t0 = time.perf_counter()
        measured = trainer.run(frames, rows, labels, weights, groups, mean, std)
        wall = time.perf_counter() - t0
    ctypes.CDLL(None).fflush(None)  # oneDNN's log lines before the result line
    return {"wall_s": wall, "useful_flops": measured["useful_flops"],
            "one_core_peak": peak["flops"], "batches": len(groups)}


def kernel_profile(n_utts: int) -> dict[str, Any]:
    """The job run plainly (wall time) and with oneDNN's verbose log (kernel times)."""
    plain = read_result(run_job("mdser.bench.kernels", str(n_utts)))
    verbose = run_job("mdser.bench.kernels", str(n_utts), ONEDNN_VERBOSE="1")
    conv_lines = [line for line in verbose.splitlines() if CONV_EXEC.match(line.strip())]
    kinds = conv_kernels(conv_lines[len(conv_lines) // 2:])  # the two passes run the same primitives
    flop, seconds = sum(k["flop"] for k in kinds.values()), sum(k["s"] for k in kinds.values())
    peak = plain["one_core_peak"]
    return {"utterances": n_utts, "batches": plain["batches"], "step_wall_s": plain["wall_s"],
            "step_useful_flops": plain["useful_flops"], "one_core_peak": peak,
            "conv_kinds": kinds, "conv_s": seconds, "conv_flops": flop / seconds,
            "conv_share_of_step": seconds / plain["wall_s"],
            "conv_fraction_of_peak": flop / seconds / peak,
            "step_fraction_of_peak": plain["useful_flops"] / peak}


def main(argv: list[str] | None = None) -> None:
    (n_utts,) = argv or sys.argv[1:]
    print_result(train_passes(int(n_utts)))


if __name__ == "__main__":
    main()
