"""The multi-dilated CNN family of the paper (Fig. 2), its losses and its receptive fields."""

from mdser.model.builder import (
    attention_weights,
    build_model,
    class_probabilities,
    compact_summary,
    dilation_schedule,
    per_sample_loss,
    receptive_field,
    stack_receptive_field,
)

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
