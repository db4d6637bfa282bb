"""Errors a user causes and can fix, apart from faults that are ours (or JAX's, XLA's).

`main` prints a `UserError` as one `error: ...` line and exits 1, without a traceback;
anything else keeps its traceback. Both subclass the built-in type a library caller
would catch (`ValueError`, `FileNotFoundError`), so `except ValueError` keeps working.
"""


class UserError(ValueError):
  """A mistake in a config, a flag, the data or the workdir; the message names the fix."""


class MissingInputError(UserError, FileNotFoundError):
  """A file, folder, dataset or checkpoint the run needs is not there."""


class DivergenceError(UserError, FloatingPointError):
  """Training produced NaN or Inf: the recipe (learning rate, warmup) needs a change."""
