"""Stand-in for torchvision.transforms.functional: the InterpolationMode enum timm keys
dicts by at import; every other public name is a placeholder."""
import enum

from torchvision._stub import module_getattr


class InterpolationMode(enum.Enum):
  NEAREST = "nearest"
  NEAREST_EXACT = "nearest-exact"
  BILINEAR = "bilinear"
  BICUBIC = "bicubic"
  BOX = "box"
  HAMMING = "hamming"
  LANCZOS = "lanczos"


__getattr__ = module_getattr(__name__)
