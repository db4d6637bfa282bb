"""Stand-in for torchvision.ops: only `misc.FrozenBatchNorm2d`, which timm imports."""
from torchvision.ops import misc  # noqa: F401
