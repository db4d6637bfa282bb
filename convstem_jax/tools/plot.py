r"""Training curves of one or several runs as one PNG: loss, eval accuracy, learning rate.

    python -m convstem_jax.tools.plot W1 [W2 ...] --out=curves.png [--labels=a,b]

Reads each workdir's metrics.jsonl only (no checkpoint needed, so runs in progress and
failed trials draw too); a sweep directory stands for all its trials.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from etils import epath

from convstem_jax import errors


def workdirs_of(path: str) -> list[str]:
  """A run's workdir, or the trial workdirs under a sweep directory."""
  root = epath.Path(path)
  if (root / "metrics.jsonl").exists():
    return [path]
  trials = sorted(str(p) for p in root.glob("*") if (p / "metrics.jsonl").exists())
  if not trials:
    raise errors.UserError(f"{path} has no metrics.jsonl, nor sub-directories with one; "
                           "pass a training run's workdir or a sweep directory.")
  return trials


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("workdirs", nargs="+", help="run workdirs or sweep directories")
  p.add_argument("--out", required=True, help="the PNG to write")
  p.add_argument("--labels", default="", help="comma-separated names, one per run")
  a = p.parse_args(argv)
  try:
    runs = [w for path in a.workdirs for w in workdirs_of(path)]
    labels = a.labels.split(",") if a.labels else None
    if labels and len(labels) != len(runs):
      raise errors.UserError(f"{len(labels)} labels for {len(runs)} runs")
    from convstem_jax.diagnostics import figures  # pylint: disable=g-import-not-at-top
    print(figures.curves_figure(runs, a.out, labels))
  except errors.UserError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  main(sys.argv[1:])
