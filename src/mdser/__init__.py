"""Multi-dilated CNN speech emotion recognition (Sci. Rep. 2025, 15:8254), reproduced.

Importing the package sets one TensorFlow switch before anything imports TensorFlow:
oneDNN's CPU kernels on every x86 CPU. TensorFlow itself turns them on only for CPUs with
AVX-512 VNNI, BF16 or AMX; on an AVX2-only CPU its own kernels train the default profile
at about half the speed and have no gradient for dilated convolutions (README,
*Performance*). `TF_ENABLE_ONEDNN_OPTS=0` in the environment keeps TensorFlow's kernels.
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
