"""TensorFlow's CPU start-up lines are dropped from a stage's stderr; real errors are not."""

from __future__ import annotations

import subprocess
import sys

from mdser.console import is_noise

# Lines as TensorFlow 2.21 prints them on a CPU-only machine (one `dvc repro` stage's stderr).
NOISE_LINES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796239925.632846    4001 port.cc:153] oneDNN custom operations are on. You may see "
    "slightly different numerical results due to floating-point round-off errors from different "
    "computation orders.",
    "I0000 00:00:1796239925.633146    4001 cudart_stub.cc:31] Could not find cuda drivers on your "
    "machine, GPU will not be used.",
    "E0000 00:00:1796239930.777418    4001 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
    "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
    "E0000 00:00:1796239201.733051    3292 meta_optimizer.cc:967] remapper failed: INVALID_ARGUMENT: "
    "Mutation::Apply error: fanout 'gradient_tape/x/LeakyReluGrad' exist for missing node 'x/BiasAdd'.",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild "
    "TensorFlow with the appropriate compiler flags.",
]
REAL_LINES = [
    "E0000 00:00:1796239930.777418    4001 op_kernel.cc:1840] OP_REQUIRES failed at conv_ops.cc:12 : "
    "INVALID_ARGUMENT: input depth must be evenly divisible by filter depth",
    "E0000 00:00:1796239201.733051    3292 meta_optimizer.cc:967] layout failed: OUT_OF_RANGE",
    "W0000 00:00:1796239201.733051    3292 op_kernel.cc:1829] OP_REQUIRES failed: RESOURCE_EXHAUSTED",
    "error: params.yaml: train.max_epochs: must be > 0",
    "Traceback (most recent call last):",
]


def test_noise_lines_are_recognised_and_real_errors_are_not():
    assert all(is_noise(line) for line in NOISE_LINES)
    assert not any(is_noise(line) for line in REAL_LINES)


def test_a_stage_process_passes_only_real_lines_even_when_it_dies(tmp_path):
    """A real stage process (run_stage outside pytest): fd-2 writes of noise vanish, the
    rest arrive in order, and the last line arrives although the process aborts."""
    script = tmp_path / "stage.py"
    script.write_text(
        "import os\n"
        "from mdser.errors import run_stage\n"
        f"LINES = {NOISE_LINES[:2] + REAL_LINES[:1] + NOISE_LINES[3:] + REAL_LINES[1:2]!r}\n"
        "def main():\n"
        "    for line in LINES:\n"
        "        os.write(2, (line + '\\n').encode())\n"
        "    os.abort()\n"
        "run_stage(main)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.splitlines() == REAL_LINES[:2]


def test_mdser_tf_logs_all_keeps_every_line(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(
        "import os\n"
        "from mdser.errors import run_stage\n"
        f"run_stage(lambda: os.write(2, {NOISE_LINES[0] + chr(10)!r}.encode()))\n"
    )
    env = {**__import__("os").environ, "MDSER_TF_LOGS": "all"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.stderr.splitlines() == [NOISE_LINES[0]]
