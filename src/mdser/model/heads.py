"""The two classifier heads and their losses (paper section "ArcFace", Eq. 12-14).

softmax: a Dense layer's logits and cross-entropy. ArcFace: ``CosineClassifier`` gives
cos(theta_j) between the unit-norm embedding and unit-norm class weights (Eq. 12);
``arcface_logits`` adds the additive angular margin m to the target class and scales by s
(Eq. 13-14) in the training loss only, so predicting never applies a margin and
``class_probabilities`` is softmax(s * cos(theta)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import keras
import numpy as np
from keras import ops

HEADS = ("softmax", "arcface")
# cos(theta) is clipped to [-1 + EPS, 1 - EPS] before sqrt(1 - cos^2) in the ArcFace margin.
ARCFACE_EPS = 1e-7


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
    """x / max(||x||_2, eps) along ``axis``."""
    norm = ops.sqrt(ops.sum(ops.square(x), axis=axis, keepdims=True))
    return x / ops.maximum(norm, eps)


@keras.saving.register_keras_serializable(package="mdser")
class CosineClassifier(keras.layers.Layer):
    """The ArcFace layer without its margin: cos(theta_j) = (x / |x|) . (W_j / |W_j|), no bias.

    Paper Eq. 12 with ||x|| = ||W_j|| = 1. The margin and scale are applied by
    ``arcface_logits`` in the training loss only. Computed in float32.
    """

    def __init__(self, n_classes: int, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.n_classes = int(n_classes)

    def build(self, x_shape):
        self.kernel = self.add_weight(shape=(x_shape[-1], self.n_classes),
                                      initializer="glorot_uniform", name="kernel")

    def call(self, x):
        return ops.matmul(l2_normalize(x, axis=-1), l2_normalize(self.kernel, axis=0))

    def compute_output_shape(self, x_shape):
        return (x_shape[0], self.n_classes)

    def get_config(self):
        return {**super().get_config(), "n_classes": self.n_classes}


def arcface_logits(cosines, labels, m, s: float):
    """ArcFace logits (paper Eq. 13): s*cos(theta_y + m) for the target, s*cos(theta_j) else.

    The target uses the numerically safe form of the reference implementations
    (insightface): with th = cos(pi - m) and mm = sin(pi - m) * m,
    phi = cos(theta + m) if cos(theta) > th (i.e. theta + m < pi) else cos(theta) - mm,
    which keeps the target logit decreasing in theta beyond pi - m. cos(theta) is clipped
    to [-1 + eps, 1 - eps] before the square root. ``m`` may be a tensor (the margin
    warm-up of training).
    """
    cosines = ops.cast(cosines, "float32")
    m = ops.cast(m, "float32")
    n_classes = cosines.shape[-1]
    cos_t = ops.clip(cosines, -1.0 + ARCFACE_EPS, 1.0 - ARCFACE_EPS)
    sin_t = ops.sqrt(1.0 - ops.square(cos_t))
    cos_t_plus_m = cos_t * ops.cos(m) - sin_t * ops.sin(m)
    th = ops.cos(math.pi - m)
    mm = ops.sin(math.pi - m) * m
    phi = ops.where(cos_t > th, cos_t_plus_m, cos_t - mm)
    target = ops.cast(ops.one_hot(ops.cast(labels, "int32"), n_classes), "bool")
    return s * ops.where(target, phi, cosines)


def sparse_cross_entropy(labels, logits, label_smoothing: float = 0.0):
    """Per-sample softmax cross-entropy (B,) of integer labels against logits (B, C)."""
    logits = ops.cast(logits, "float32")
    n_classes = logits.shape[-1]
    target = ops.one_hot(ops.cast(labels, "int32"), n_classes, dtype="float32")
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + label_smoothing / n_classes
    return -ops.sum(target * ops.log_softmax(logits, axis=-1), axis=-1)


def per_sample_loss(head: str, head_params: Mapping) -> Callable:
    """``loss(labels (B,) int, outputs (B, C), margin_fraction=1) -> (B,)`` for the head.

    ``head_params`` is the head's own section of params.yaml (``params[head]``).
    softmax: cross-entropy of the logits with ``label_smoothing``.
    arcface: cross-entropy of the ArcFace logits (Eq. 12-14, scale ``s``) with the margin
    ``margin_fraction * m``: training ramps it from 0 to ``m`` (``arcface.margin_warmup``).
    """
    if head == "softmax":
        smoothing = float(head_params["label_smoothing"])

        def softmax_loss(labels, logits, margin_fraction=1.0):
            return sparse_cross_entropy(labels, logits, smoothing)

        return softmax_loss
    if head == "arcface":
        m, s = float(head_params["m"]), float(head_params["s"])

        def arcface_loss(labels, cosines, margin_fraction=1.0):
            return sparse_cross_entropy(labels, arcface_logits(cosines, labels, margin_fraction * m, s))

        return arcface_loss
    raise ValueError(f"model.head must be one of {HEADS}, got {head!r}")


def class_probabilities(head: str, outputs, head_params: Mapping):
    """Class probabilities without margin: softmax(logits) or softmax(s * cos(theta)),
    ``head_params`` being the head's section of params.yaml."""
    logits = ops.cast(outputs, "float32")
    if head == "arcface":
        logits = float(head_params["s"]) * logits
    probs = ops.softmax(logits, axis=-1)
    return ops.convert_to_numpy(probs) if isinstance(outputs, np.ndarray) else probs
