r"""Xiao et al.'s stability protocol, read back: error distributions, EDF figure, and the
optimizer-gap and training-length tables.

    python -m convstem_jax.tools.stability SWEEP_OR_RUN [...] [--labels=a,b] [--out=DIR]

Each path is a sweep (a `tools/sweep` directory, or any directory holding one workdir
per trial, e.g. the 64 of `configs/early_conv.py:model=M,opt=O,trial=i`) or a single
run's workdir. Printed:
- per path, the best top-1 error and the empirical distribution function of Xiao et
  al.'s Figures 3-4: the fraction of trials within d points of that sweep's best. The
  paper's claim for SGD: about 60% of ViT_C-18GF trials within 4 points, under 20% of
  ViT_P-18GF's;
- the optimizer gap (Figure 1): per model and length, the best error with SGD minus
  with AdamW, when both were given;
- the training length (Figure 2): per model and optimizer, the best error at each
  length given (steps trained) and its gap to the longest, when several were given.
Models, optimizers and lengths are read from the trials' config.json (`model_name`,
`optimizer`) and metrics.jsonl (last step). With --out, DIR/edf.png draws the EDFs
overlaid (one curve per path) and DIR/stability.json holds every number printed.
A trial counts with its last logged eval; trials that never evaluated, diverged
(non-finite accuracy) or that tools/sweep did not record as finished count as
infinitely far from the best: they never enter the EDF, so a sweep's failures show.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
from typing import Iterable, NamedTuple, Sequence

from etils import epath

from convstem_jax import errors as errors_lib
from convstem_jax import metrics

DELTAS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def final_metric(workdir: epath.PathLike, metric: str = "auto") -> float | None:
  """The last logged value of `metric` in a run's metrics.jsonl (None if never logged).

  'auto' takes the EMA accuracy of the first eval split when the run logged one, else
  the raw accuracy (`<split>_ema/accuracy`, then `<split>/accuracy`).
  """
  return _last_metric(metrics.read_records(workdir), metric)


def _last_metric(rows: Sequence[dict], metric: str) -> float | None:
  value = None
  for row in rows:
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


def _trials(root: epath.Path) -> list[tuple[epath.Path, bool]]:
  """(workdir, finished) of each trial: those tools/sweep recorded in sweep.json (a trial
  not finished there counts as a failure), else the path itself when it is a run, else
  every sub-directory."""
  if (root / "sweep.json").exists():  # trials live in the sweep directory, wherever it is now
    return [(root / epath.Path(t["workdir"]).name, t["status"] == "finished")
            for t in json.loads((root / "sweep.json").read_text())["trials"]]
  if (root / "metrics.jsonl").exists():
    return [(root, True)]
  return [(p, True) for p in sorted(root.iterdir()) if p.is_dir()]


def _records(trial: epath.Path) -> list[dict]:
  return metrics.read_records(trial) if trial.exists() else []


def _error(rows: Sequence[dict], finished: bool, metric: str) -> float:
  """Top-1 error in points; inf for an unfinished, never evaluated or diverged trial."""
  acc = _last_metric(rows, metric) if finished else None
  return 100.0 * (1.0 - acc) if acc is not None and math.isfinite(acc) else math.inf


def sweep_errors(sweep_dir: epath.PathLike, metric: str = "auto") -> list[float]:
  """Top-1 error (in points) of every trial of a sweep (or of a single run)."""
  return [_error(_records(trial), finished, metric)
          for trial, finished in _trials(epath.Path(sweep_dir))]


class Sweep(NamedTuple):
  label: str
  errors: list[float]
  model: str | None       # config.json's model_name (None: no config.json found)
  optimizer: str | None
  steps: int              # the longest a trial ran (last logged step)

  @property
  def best(self) -> float:
    return min(self.errors)


def read_sweep(path: str, label: str = "", metric: str = "auto") -> Sweep:
  root = epath.Path(path)
  if not root.is_dir():
    raise errors_lib.UserError(f"{path} is not a directory; pass a sweep directory or a "
                               "run's workdir.")
  trials = _trials(root)
  if not trials:
    raise errors_lib.UserError(f"No trial directories under {path}; pass the directory "
                               "that holds one workdir per trial, or a run's workdir.")
  model = optimizer = None
  steps, errors = 0, []
  for trial, finished in trials:
    if model is None and (trial / "config.json").exists():
      config = json.loads((trial / "config.json").read_text())
      model, optimizer = config.get("model_name"), config.get("optimizer")
    rows = _records(trial)  # read once: the error and the length
    errors.append(_error(rows, finished, metric))
    steps = max([steps] + [int(r["step"]) for r in rows])
  return Sweep(label or root.name, errors, model, optimizer, steps)


def _cell(error: float) -> str:
  return f"{error:.2f}" if math.isfinite(error) else "none finished"


def edf_table(sweeps: Sequence[Sweep]) -> str:
  head = "| sweep | trials | best error | " + " | ".join(f"≤ best+{d:g}" for d in DELTAS)
  lines = [head + " |", "|---" * (3 + len(DELTAS)) + "|"]
  for s in sweeps:
    fractions = edf(s.errors)
    lines.append(f"| {s.label} | {len(s.errors)} | {_cell(s.best)} | "
                 + " | ".join(f"{fractions[x]:.0%}" for x in DELTAS) + " |")
  return "\n".join(lines)


def optimizer_gaps(sweeps: Sequence[Sweep]) -> dict[str, dict[str, float]]:
  """{'model @ N steps': {'adamw': best, 'sgd': best, 'gap': sgd - adamw}} for each model
  and length run with both optimizers."""
  best = collections.defaultdict(dict)
  for s in sweeps:
    if s.model and s.optimizer:
      key = f"{s.model} @ {s.steps} steps"
      best[key][s.optimizer] = min(best[key].get(s.optimizer, math.inf), s.best)
  return {k: {**b, "gap": b["sgd"] - b["adamw"]} for k, b in best.items()
          if {"adamw", "sgd"} <= set(b)}


def length_gaps(sweeps: Sequence[Sweep]) -> dict[str, dict[int, float]]:
  """{'model optimizer': {steps: best error}} for those run at several lengths."""
  best = collections.defaultdict(dict)
  for s in sweeps:
    if s.model and s.optimizer:
      key = f"{s.model} {s.optimizer}"
      best[key][s.steps] = min(best[key].get(s.steps, math.inf), s.best)
  return {k: dict(sorted(v.items())) for k, v in best.items() if len(v) > 1}


def report(sweeps: Sequence[Sweep]) -> str:
  out = [edf_table(sweeps)]
  gaps = optimizer_gaps(sweeps)
  if gaps:
    out += ["", "Optimizer gap (best error, points; Xiao et al. Fig. 1):", "",
            "| model @ length | AdamW | SGD | SGD - AdamW |", "|---|---|---|---|"]
    out += [f"| {m} | {_cell(g['adamw'])} | {_cell(g['sgd'])} | {g['gap']:+.2f} |"
            for m, g in gaps.items()]
  lengths = length_gaps(sweeps)
  if lengths:
    out += ["", "Training length (best error, points, and gap to the longest; Xiao et "
            "al. Fig. 2):", ""]
    for key, by_steps in lengths.items():
      longest = by_steps[max(by_steps)]
      out += [f"| {key} | " + " | ".join(f"{n} steps" for n in by_steps) + " |",
              "|---" * (1 + len(by_steps)) + "|",
              "| error (gap) | " + " | ".join(f"{_cell(e)} ({e - longest:+.2f})"
                                            for e in by_steps.values()) + " |", ""]
  return "\n".join(out).rstrip()


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("sweeps", nargs="+", help="sweep directories or run workdirs")
  parser.add_argument("--labels", default="", help="comma-separated names, one per path")
  parser.add_argument("--metric", default="auto",
                      help="metrics.jsonl key, e.g. validation_ema/accuracy (default: "
                           "the EMA accuracy if logged, else the raw one)")
  parser.add_argument("--out", default="", help="directory for edf.png and stability.json")
  args = parser.parse_args(argv)
  try:
    labels = args.labels.split(",") if args.labels else [""] * len(args.sweeps)
    if len(labels) != len(args.sweeps):
      raise errors_lib.UserError(f"{len(labels)} labels for {len(args.sweeps)} paths")
    sweeps = [read_sweep(p, l, args.metric) for p, l in zip(args.sweeps, labels)]
    print(report(sweeps))
    if args.out:
      from convstem_jax.diagnostics import figures  # pylint: disable=g-import-not-at-top
      out = epath.Path(args.out)
      print(figures.edf_figure({s.label: s.errors for s in sweeps}, out / "edf.png"))
      finite = lambda e: e if math.isfinite(e) else None
      (out / "stability.json").write_text(json.dumps({
          "sweeps": [{"label": s.label, "path": p, "model": s.model,
                      "optimizer": s.optimizer, "steps": s.steps,
                      "errors": [finite(e) for e in s.errors], "best": finite(s.best),
                      "edf": {str(d): f for d, f in edf(s.errors).items()}}
                     for s, p in zip(sweeps, args.sweeps)],
          "optimizer_gap": {k: {o: finite(e) for o, e in v.items()}
                            for k, v in optimizer_gaps(sweeps).items()},
          "training_length": {k: {str(n): finite(e) for n, e in v.items()}
                              for k, v in length_gaps(sweeps).items()}}, indent=1))
  except errors_lib.UserError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  main()
