"""Test-only stand-in for torchvision (see tests/stubs/README.md).

timm imports torchvision at import time (FrozenBatchNorm2d, transforms, datasets); the
ViT parity tests use none of it. This package supplies just those names so `import timm`
and building timm ViT models work on CPU without a torchvision build.
"""

__version__ = "0.0.0+stub"
from torchvision import datasets, ops, transforms  # noqa: E402,F401
