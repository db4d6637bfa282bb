"""Import a package, or the import-only stand-in under tests/stubs where it cannot be.

timm imports torchvision; some registries ship a torchvision built for another torch
(it fails at import). The stand-in supplies the names timm's import touches and is never
used for computation.
"""

import importlib
import importlib.util
import sys
from pathlib import Path

STUBS = Path(__file__).parent / "stubs"


def ensure_importable(name: str) -> None:
  """Import `name`; if that fails (absent, or e.g. a torchvision built for another
  torch), load the stand-in package tests/stubs/<name> under that name instead."""
  try:
    importlib.import_module(name)
    return
  except Exception:  # noqa: BLE001 - any failure means "not usable here"
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
      del sys.modules[mod]
  spec = importlib.util.spec_from_file_location(
      name, STUBS / name / "__init__.py", submodule_search_locations=[str(STUBS / name)])
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
