r"""Xiao et al.'s stability protocol, read back: the error distribution of a sweep.

After the 64 trials of `configs/early_conv.py:model=M,opt=O,trial=i` (one workdir each),

    python -m convstem_jax.tools.stability gs://BUCKET/early_conv/stab_vitc_18gf_sgd \
        gs://BUCKET/early_conv/stab_vitp_18gf_sgd

prints, per sweep directory (its sub-directories are the trials), the best top-1 error
and the empirical distribution function of the paper's Figures 3-4: the fraction of
trials whose error is within d points of that sweep's best run. The paper's claim for
SGD: about 60% of ViT_C-18GF trials within 4 points, under 20% of ViT_P-18GF's.
A trial counts with its last logged eval; trials that never evaluated or diverged
(non-finite accuracy) count as infinitely far from the best, so a sweep's failures show.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Iterable, Sequence

from etils import epath

from convstem_jax import metrics

DELTAS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def final_metric(workdir: epath.PathLike, metric: str = "auto") -> float | None:
  """The last logged value of `metric` in a run's metrics.jsonl (None if never logged).

  'auto' takes the EMA accuracy of the first eval split when the run logged one, else
  the raw accuracy (`<split>_ema/accuracy`, then `<split>/accuracy`).
  """
  value = None
  for row in metrics.read_records(workdir):
    key = metric if metric != "auto" else _auto_key(row)
    if key is not None and key in row:
      value = float(row[key])
  return value


def _auto_key(row: dict) -> str | None:
  keys = [k for k in row if k.endswith("/accuracy") and not k.startswith("train/")]
  ema = [k for k in keys if "_ema/" in k]
  return (ema or keys or [None])[0]


def edf(errors: Sequence[float], deltas: Iterable[float] = DELTAS) -> dict[float, float]:
  """{d: fraction of runs with error <= best + d}; non-finite errors never count."""
  finite = [e for e in errors if math.isfinite(e)]
  if not finite:
    return {d: 0.0 for d in deltas}
  best = min(finite)
  return {d: sum(e <= best + d for e in finite) / len(errors) for d in deltas}


def sweep_errors(sweep_dir: epath.PathLike, metric: str = "auto") -> list[float]:
  """Top-1 error (in points) of every trial of a sweep: those `tools/sweep` recorded in
  sweep.json (a trial not finished counts as a failure, inf), else every directory."""
  root = epath.Path(sweep_dir)
  if (root / "sweep.json").exists():
    trials = [(epath.Path(t["workdir"]), t["status"] == "finished")
              for t in json.loads((root / "sweep.json").read_text())["trials"]]
  else:
    trials = [(p, True) for p in sorted(root.iterdir()) if p.is_dir()]
  errors = []
  for trial, finished in trials:
    acc = final_metric(trial, metric) if finished and trial.exists() else None
    ok = acc is not None and math.isfinite(acc)
    errors.append(100.0 * (1.0 - acc) if ok else math.inf)
  return errors


def report(sweep_dirs: Sequence[str], metric: str = "auto") -> str:
  head = "| sweep | trials | best error | " + " | ".join(f"≤ best+{d:g}" for d in DELTAS)
  lines = [head + " |", "|---" * (3 + len(DELTAS)) + "|"]
  for d in sweep_dirs:
    errors = sweep_errors(d, metric)
    if not errors:
      raise FileNotFoundError(f"No trial directories under {d}; pass the directory that "
                              "holds one workdir per trial.")
    best = min(errors)
    fractions = edf(errors)
    cells = [f"{fractions[x]:.0%}" for x in DELTAS]
    best_cell = f"{best:.2f}" if math.isfinite(best) else "none finished"
    lines.append(f"| {epath.Path(d).name} | {len(errors)} | {best_cell} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("sweeps", nargs="+", help="directories holding one workdir per trial")
  parser.add_argument("--metric", default="auto",
                      help="metrics.jsonl key, e.g. validation_ema/accuracy (default: "
                           "the EMA accuracy if logged, else the raw one)")
  args = parser.parse_args(argv)
  try:
    print(report(args.sweeps, args.metric))
  except FileNotFoundError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  main()
