"""convstem_jax: Vision Transformers whose stems and attention initialisation decide how
well they train (patchify, conv and scaled-ReLU stems; structured attention init)."""

__version__ = "0.1.0"
