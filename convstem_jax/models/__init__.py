"""Vision Transformer models: `create_model(name, **overrides)`."""

from convstem_jax.models.variants import (VARIANTS, create_model, model_from_config,
                                          model_names)
from convstem_jax.models.vit import ViT

__all__ = ["VARIANTS", "ViT", "create_model", "model_from_config", "model_names"]
