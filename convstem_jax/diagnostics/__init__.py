"""Diagnostics of trained or freshly initialised models."""

from convstem_jax.diagnostics.attention import (HeadScore, blank_image_attention,
                                                score_attention, score_model)

__all__ = ["HeadScore", "blank_image_attention", "score_attention", "score_model"]
