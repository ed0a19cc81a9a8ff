"""The paper's model family (Fig. 2, 4; Table 1 and 3) built from the ``model`` parameters.

    features (B, 40, T, 3) + lengths (B,)
    -> layer 1: conv (plain 5x3, or FF 5x1 -> 1x3) + LeakyReLU, 2x2 'valid' max pool: 40 -> 20
    -> layers 2-8: 7 plain convs / FF convs / FF convs with dilation 2 / MDCBs (Fig. 4)
    -> GMP or SPP (Fig. 5) over the real frames -> (B, K, C) bins
    -> optional attention over the K bins (Eq. 9-11)
    -> FC(fc_units) + LeakyReLU
    -> softmax head: Dense(n_classes) logits | arcface head: cos(theta_j) (Eq. 12)

Every convolution uses 'same' padding and is followed by LeakyReLU and re-zeroing of the
padded frames, so a batch of zero-padded utterances gives exactly the per-utterance outputs.
Kernel 5 spans frequency (axis 1), kernel 3 spans time (axis 2). Outputs are float32 under
any dtype policy.

Choices the paper leaves open (and what is done here):
* 40 -> 20 bands: one 2x2 max pooling (stride 2, 'valid') after the initial layer; the time
  axis is halved too (floor(L / 2)) so windows never mix real frames with padding.
* MDCB branch merge: ``merge`` = sum (default, keeps ``filters`` channels) or concat.
* Branch order and block numbering: MDCB k (k = 1..7) is block 3i+1/3i+2/3i+3 by k mod 3.
* SPP bin placement: adaptive max pooling bins (see ``layers.adaptive_bins``).
* Attention shape: W, b shared over the K pooled bins; alpha is one weight per bin.
* FC: ``fc_units`` units with LeakyReLU (slope ``layers.LEAKY_SLOPE``) for both heads; the
  ArcFace embedding is this activated FC output.
* LeakyReLU slope 0.3 (the Keras default; the paper gives none); Keras default initialisers.
* No batch normalisation and no dropout (the paper names neither).
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
from keras import layers

from mdser.model.heads import CosineClassifier
from mdser.model.layers import (
    LEAKY_SLOPE,
    BinAttention,
    Conv2D,
    MaskedBatchNorm,
    MaskedGlobalMaxPooling,
    MaskFrames,
    MaxPool2x2,
    PoolLengths,
    SpatialPyramidPooling,
)

CONVS = ("plain", "ff", "dilated", "mdcb")
N_STACK = 7  # layers/blocks after the initial layer: 8 layers in total (paper, Table 1)
TIME_KERNEL = 3
FREQ_KERNEL = 5


# ----------------------------------------------------------------------------- schedules


def dilation_schedule(conv: str) -> list[tuple[int, ...]]:
    """Branch dilation rates of the 7 layers/blocks after the initial layer (layers 2-8).

    plain, ff: 1; dilated: 2; mdcb (Fig. 4): block 3i+1 -> (1, 2), 3i+2 -> (2,), 3i+3 -> (3, 2).
    The initial layer (layer 1) always has dilation 1.
    """
    if conv in ("plain", "ff"):
        return [(1,)] * N_STACK
    if conv == "dilated":
        return [(2,)] * N_STACK
    if conv == "mdcb":
        cycle = [(1, 2), (2,), (3, 2)]
        return [cycle[k % 3] for k in range(N_STACK)]
    raise ValueError(f"model.conv must be one of {CONVS}, got {conv!r}")


def receptive_field(kernel: int, dilations: list[int]) -> int:
    """Receptive field along one axis of stacked convolutions, paper Eq. 7:
    RF = (K - 1) * sum_l dr_l + 1."""
    return (kernel - 1) * sum(dilations) + 1


def stack_receptive_field(conv: str) -> int:
    """Time-axis RF (in frames after the initial pooling) of layers 2-8: a multi-branch block
    reaches as far as its widest branch."""
    return receptive_field(TIME_KERNEL, [max(block) for block in dilation_schedule(conv)])


# ----------------------------------------------------------------------------- conv section


def conv_unit(x, lengths, filters: int, kernel: tuple[int, int], dilation: tuple[int, int],
              name: str, norm: str, mask: bool = True):
    """Conv2D ('same') + bias -> LeakyReLU, or with ``norm`` = batch Conv2D -> masked batch
    normalisation -> LeakyReLU; then re-zero the padded frames when the next layer mixes
    frames (a 1x3 or 5x3 convolution); a 5x1 convolution, a 2x2 pooling of real frames and
    SPP/GMP never read a padded frame into a real one."""
    x = Conv2D(filters, kernel, padding="same", dilation_rate=dilation, use_bias=norm == "none",
               kernel_initializer="he_uniform", name=name)(x)
    if norm == "batch":
        x = MaskedBatchNorm(name=f"{name}_bn")(x, lengths)
    x = layers.LeakyReLU(LEAKY_SLOPE, name=f"{name}_act")(x)
    return MaskFrames(name=f"{name}_mask")(x, lengths) if mask else x


def ff_branch(x, lengths, filters: int, dilation: int, name: str, norm: str):
    """Filter factorisation of a 5x3 conv (Fig. 4): 5x1 (dilation (d, 1)) -> 1x3 (1, d).
    Only the 1x3 convolution's input needs zeroed padding."""
    x = conv_unit(x, lengths, filters, (FREQ_KERNEL, 1), (dilation, 1), f"{name}_5x1", norm)
    return conv_unit(x, lengths, filters, (1, TIME_KERNEL), (1, dilation), f"{name}_1x3", norm,
                     mask=False)


def mdcb(x, lengths, filters: int, dilations: tuple[int, ...], merge: str, name: str, norm: str):
    """The multi-dilated convolution block (Fig. 4): one FF branch per dilation rate, merged
    by element-wise sum (``merge`` = sum) or channel concatenation (concat)."""
    branches = [ff_branch(x, lengths, filters, d, f"{name}_d{d}", norm) for d in dilations]
    if len(branches) == 1:
        return branches[0]
    if merge == "sum":
        return layers.Add(name=f"{name}_sum")(branches)
    return layers.Concatenate(axis=-1, name=f"{name}_concat")(branches)


def initial_layer(features, lengths, conv: str, filters: int, norm: str):
    """Layer 1: plain 5x3 conv (conv=plain) or FF 5x1 -> 1x3 (others), dilation 1, then a 2x2
    'valid' max pooling (40 -> 20 bands, L -> floor(L / 2) frames). Returns (x, lengths)."""
    if conv == "plain":
        x = conv_unit(features, lengths, filters, (FREQ_KERNEL, TIME_KERNEL), (1, 1),
                      "layer1_5x3", norm, mask=False)
    else:
        x = ff_branch(features, lengths, filters, 1, "layer1", norm)
    x = MaxPool2x2(name="layer1_pool")(x)
    lengths = PoolLengths(2, name="layer1_pool_lengths")(lengths)
    if conv == "plain":  # the next 5x3 convolution mixes frames
        x = MaskFrames(name="layer1_pool_mask")(x, lengths)
    return x, lengths


def conv_stack(x, lengths, conv: str, filters: int, merge: str, norm: str):
    """Layers 2-8 (paper Table 1 'CNN section'), all at the pooled resolution.

    plain: 5x3 conv; ff: FF 5x1 -> 1x3; dilated: FF with dilation 2; mdcb: 7 multi-dilated
    conv blocks (Fig. 4) whose FF branches are merged by ``merge`` (sum | concat). One-branch
    blocks are the FF layers of the other variants.
    """
    for k, dilations in enumerate(dilation_schedule(conv), start=2):
        if conv == "plain":
            last = k == N_STACK + 1  # SPP/GMP read real frames only
            x = conv_unit(x, lengths, filters, (FREQ_KERNEL, TIME_KERNEL), (1, 1),
                          f"layer{k}_5x3", norm, mask=not last)
        else:
            x = mdcb(x, lengths, filters, dilations, merge, f"layer{k}", norm)
    return x


# ----------------------------------------------------------------------------- the model


def build_model(model: Mapping, n_classes: int, n_mels: int = 40) -> keras.Model:
    """Build one model of the family from the ``model`` parameters (params.yaml).

    Inputs (a dict): ``features`` float32 (B, n_mels, T, 3), zero-padded along time, and
    ``lengths`` int32 (B,), the true frame counts (at least 2, so that one frame survives the
    initial pooling; shorter utterances would leave SPP bins empty). Output float32
    (B, n_classes): logits for head=softmax, cos(theta_j) without margin for head=arcface.
    The parameters are the ones `mdser.params` validated (the one check of their values).
    """
    filters = int(model["filters"])
    features = keras.Input((n_mels, None, 3), name="features", dtype="float32")
    lengths = keras.Input((), name="lengths", dtype="int32")

    x, frames = initial_layer(features, lengths, model["conv"], filters, model["norm"])
    x = conv_stack(x, frames, model["conv"], filters, model["merge"], model["norm"])

    if model["pooling"] == "gmp":
        bins = MaskedGlobalMaxPooling(name="gmp")(x, frames)  # (B, 1, C)
    else:
        bins = SpatialPyramidPooling(model["spp_levels"], n_mels // 2, name="spp")(x, frames)  # (B, K, C)
    if model["attention"]:
        bins, _ = BinAttention(int(model["attention_units"]), name="attention")(bins)

    h = layers.Flatten(name="flatten")(bins)
    h = layers.Dense(int(model["fc_units"]), name="fc")(h)
    h = layers.LeakyReLU(LEAKY_SLOPE, name="fc_act")(h)
    if model["head"] == "softmax":
        out = layers.Dense(n_classes, dtype="float32", name="logits")(h)
    else:
        out = CosineClassifier(n_classes, name="cosine")(h)

    name = f"mdser_{model['conv']}_{model['pooling']}{'_att' if model['attention'] else ''}_{model['head']}"
    return keras.Model({"features": features, "lengths": lengths}, out, name=name)


def attention_weights(model: keras.Model) -> keras.Model:
    """Sub-model with the same inputs returning the attention weights alpha (B, K)."""
    return keras.Model(model.input, model.get_layer("attention").output[1],
                       name=f"{model.name}_alpha")


# ----------------------------------------------------------------------------- summary


def compact_summary(model: keras.Model) -> list[str]:
    """One line per paper-level stage (layer1..layer8, pooling, attention, fc, head):
    its Keras layers' types, last output shape and parameter count."""
    groups: dict[str, list[keras.layers.Layer]] = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        groups.setdefault(layer.name.split("_")[0], []).append(layer)
    lines = []
    for stage, members in groups.items():
        kinds = sorted({type(layer).__name__ for layer in members})
        params = sum(layer.count_params() for layer in members)
        output = members[-1].output
        shape = tuple((output[0] if isinstance(output, list) else output).shape)
        lines.append(f"{stage:<10} {str(shape):<22} {params:>9,}  {', '.join(kinds)}")
    lines.append(f"{'total':<10} {'':<22} {model.count_params():>9,}")
    return lines
