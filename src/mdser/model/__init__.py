"""The multi-dilated CNN family of the paper (Fig. 2), its losses and its receptive fields."""

from mdser.model.builder import (
    attention_weights,
    build_model,
    compact_summary,
    dilation_schedule,
    receptive_field,
    stack_receptive_field,
)
from mdser.model.heads import class_probabilities, per_sample_loss

__all__ = [
    "attention_weights",
    "build_model",
    "class_probabilities",
    "compact_summary",
    "dilation_schedule",
    "per_sample_loss",
    "receptive_field",
    "stack_receptive_field",
]
