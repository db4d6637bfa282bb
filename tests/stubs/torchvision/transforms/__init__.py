"""Stand-in for torchvision.transforms: every public name is a placeholder class.

timm subclasses a few (e.g. ToTensor) and names others at import; none may be used.
"""
from torchvision._stub import module_getattr
from torchvision.transforms import functional  # noqa: F401

__getattr__ = module_getattr(__name__)
