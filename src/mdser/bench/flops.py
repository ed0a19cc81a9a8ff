"""Analytic FLOP counts of a built model, from its Conv2D / Dense / head shapes.

2 x MACs per forward pass, x 3 for a training step (forward + backward). Element-wise ops
(bias, LeakyReLU, masking, pooling) are not counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def model_flops(model: Any) -> dict[str, float]:
    """Analytic forward MACs of a built model: per input frame (convs) and per utterance.

    Layer 1 (names ``layer1_*``) runs at the input's time resolution; every later conv
    after the 2x2 pooling at half of it. Frequency size and channels are static.
    """
    import keras

    per_frame, per_utt, conv_layers = 0.0, 0.0, 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            f_in, c_in = layer.input.shape[1], layer.input.shape[-1]
            time_scale = 1.0 if layer.name.startswith("layer1_") else 0.5
            per_frame += f_in * time_scale * kh * kw * c_in * layer.filters
            conv_layers += 1
        elif isinstance(layer, keras.layers.Dense):
            per_utt += float(np.prod(layer.input.shape[1:])) * layer.units
        elif hasattr(layer, "kernel") and hasattr(layer, "n_classes"):  # CosineClassifier
            per_utt += float(np.prod(layer.kernel.shape))
        elif hasattr(layer, "units") and hasattr(layer, "w"):  # BinAttention
            bins = layer.input.shape[1]
            per_utt += bins * float(np.prod(layer.w.shape))
    return {
        "conv_layers": conv_layers,
        "fwd_flop_per_frame": 2.0 * per_frame,
        "fwd_flop_per_utt": 2.0 * per_utt,
        "train_flop_per_frame": 6.0 * per_frame,
        "train_flop_per_utt": 6.0 * per_utt,
        "params": int(model.count_params()),
    }
