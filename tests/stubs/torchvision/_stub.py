"""Helper for the torchvision stand-in: named placeholders that fail loudly when used."""


def placeholder(module: str, name: str):
  """A class that can be named, subclassed and compared but not instantiated."""
  def __init__(self, *args, **kwargs):
    raise NotImplementedError(f"{module}.{name} is a test stand-in (the real package is "
                              "not installed); it cannot be used.")
  return type(name, (), {"__init__": __init__, "__module__": module})


def module_getattr(module: str):
  """PEP 562 module __getattr__ handing out placeholders for public names only."""
  def __getattr__(name: str):
    if name.startswith("_"):  # keep import machinery probes (__path__, ...) honest
      raise AttributeError(f"module {module!r} has no attribute {name!r}")
    return placeholder(module, name)
  return __getattr__
