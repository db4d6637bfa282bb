"""Test-only stand-in for Pillow (see tests/stubs/README.md).

timm's data package imports PIL.Image (and ImageOps, ImageEnhance, ...) and builds
interpolation tables from Image.Resampling at import time. This supplies those names;
anything that would touch an image raises.
"""
import enum
import sys
import types

__version__ = "0.0.0+stub"


def _getattr_for(module: str):
  def __getattr__(name: str):
    if name.startswith("_"):
      raise AttributeError(f"module {module!r} has no attribute {name!r}")

    def fail(*args, **kwargs):
      raise NotImplementedError(f"{module}.{name} is a test stand-in (Pillow is not "
                                "installed); it cannot be used.")
    return type(name, (), {"__init__": fail, "__module__": module})
  return __getattr__


class _Resampling(enum.IntEnum):
  NEAREST = 0
  LANCZOS = 1
  BILINEAR = 2
  BICUBIC = 3
  BOX = 4
  HAMMING = 5


# Submodules are plain module objects registered here, so `from PIL import ImageOps` and
# `import PIL.Image` both resolve without a file per module.
for _name in ("Image", "ImageOps", "ImageEnhance", "ImageChops", "ImageFilter"):
  _mod = types.ModuleType(f"{__name__}.{_name}")
  _mod.__getattr__ = _getattr_for(_mod.__name__)
  sys.modules[_mod.__name__] = _mod
  globals()[_name] = _mod

Image.Resampling = _Resampling
Image.AFFINE = 0
for _r in _Resampling:
  setattr(Image, _r.name, _r)
