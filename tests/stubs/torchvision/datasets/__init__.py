"""Stand-in for torchvision.datasets: every public name (CIFAR10, ImageFolder, ...) is a
placeholder class that raises when instantiated."""
from torchvision._stub import module_getattr

__getattr__ = module_getattr(__name__)
