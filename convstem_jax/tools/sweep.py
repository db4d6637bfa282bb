r"""Xiao et al.'s stability protocol for any config: N (lr, wd) trials, run or printed.

    python -m convstem_jax.tools.sweep --config=configs/elpv.py:stem=conv --trials=12 \
        --workdir=sweeps/elpv_conv_adamw [--config.FIELD=VALUE ...] [--print_commands]
    python -m convstem_jax.tools.stability sweeps/elpv_conv_adamw sweeps/elpv_patchify_adamw

Draws N (lr, weight decay) pairs log-uniformly (seed --seed, so two configs with the
same search space get the same pairs: a fair comparison): from Xiao et al.'s Table 4
intervals for `configs/early_conv.py` (its `SEARCH_SPACE`, per optimizer), and for any
other config from the same width ratios around its own values, [v/8, 4v] (Table 4's
intervals are 1/8x to 4x of a good value); a weight decay of 0 stays 0. Trial i runs
`python -m convstem_jax.main --config=... [overrides] --config.lr=.. --config.weight_decay=..
--workdir=SWEEP/trial_<i>`, one after another on this machine; `--print_commands`
prints those commands instead (a cluster array job, one TPU slice per trial).
Resumable: SWEEP/sweep.json records the pairs and each trial's status; a rerun skips
finished trials, resumes interrupted ones from their checkpoints (the trainer does) and
does not retry failed ones (a diverged trial fails the same way again). Failed and
unfinished trials count as failures in `tools/stability`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shlex
import subprocess
import sys
from typing import Sequence

import numpy as np
from etils import epath

from convstem_jax import errors
from convstem_jax import main as main_lib

WIDTH = (1 / 8, 4.0)  # Table 4: intervals from 1/8x to 4x of a good value


def search_space(config_arg: str, config) -> dict[str, tuple[float, float]]:
  """{'lr': (lo, hi), 'weight_decay': (lo, hi)}, log scale; a 0 decay is left out."""
  path = config_arg.split(":", 1)[0]
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  paper = getattr(module, "SEARCH_SPACE", {}).get(config.optimizer)
  if paper:
    return {k: (lo, hi) for k, (lo, hi, _) in paper.items()}
  space = {"lr": (config.lr * WIDTH[0], config.lr * WIDTH[1])}
  if config.weight_decay:
    space["weight_decay"] = (config.weight_decay * WIDTH[0], config.weight_decay * WIDTH[1])
  return space


def draw(space: dict, trials: int, seed: int) -> list[dict[str, float]]:
  rng = np.random.default_rng(seed)
  draws = {k: np.exp(rng.uniform(math.log(lo), math.log(hi), trials))
           for k, (lo, hi) in space.items()}
  return [{k: float(v[i]) for k, v in draws.items()} for i in range(trials)]


def command(config_arg: str, overrides: Sequence[str], pair: dict, workdir: str) -> list[str]:
  return [sys.executable, "-m", "convstem_jax.main", f"--config={config_arg}", *overrides,
          *[f"--config.{k}={v!r}" for k, v in pair.items()], f"--workdir={workdir}"]


def run(config_arg: str, trials: int, sweep_dir: str, overrides: Sequence[str] = (),
        seed: int = 0, print_commands: bool = False) -> list[dict]:
  config = main_lib.config_from_args(config_arg, overrides)
  pairs = draw(search_space(config_arg, config), trials, seed)
  root = epath.Path(sweep_dir)
  root.mkdir(parents=True, exist_ok=True)
  record_path = root / "sweep.json"
  record = json.loads(record_path.read_text()) if record_path.exists() else {}
  if record and (record["config"], record["overrides"], record["seed"]) != (
      config_arg, list(overrides), seed):
    raise errors.UserError(f"{sweep_dir} holds a sweep of other settings ({record['config']} "
                           f"{' '.join(record['overrides'])}, seed {record['seed']}); "
                           "use a new --workdir.")
  status = {t["trial"]: t["status"] for t in record.get("trials", [])}
  rows = [dict(trial=i, **pair, workdir=str(root / f"trial_{i:03d}"),
               status=status.get(i, "pending")) for i, pair in enumerate(pairs)]

  def save():
    record_path.write_text(json.dumps({"config": config_arg, "overrides": list(overrides),
                                       "seed": seed, "trials": rows}, indent=1))
  save()
  for row in rows:
    cmd = command(config_arg, overrides, {k: row[k] for k in pairs[0]}, row["workdir"])
    if print_commands:
      print(shlex.join(cmd))
      continue
    if row["status"] in ("finished", "failed"):
      continue
    print(f"trial {row['trial']}/{trials}: " +
          ", ".join(f"{k}={row[k]:.3g}" for k in pairs[0]), flush=True)
    proc = subprocess.run(cmd, check=False)
    if proc.returncode in (0, 1):  # 1: a user-facing failure such as divergence
      row["status"] = "finished" if proc.returncode == 0 else "failed"
      save()
    else:  # preempted (75), killed: stop here; a rerun resumes this trial
      save()
      raise SystemExit(proc.returncode)
  return rows


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="configs/X.py[:args], as for main")
  p.add_argument("--trials", type=int, required=True)
  p.add_argument("--workdir", required=True, help="the sweep's directory")
  p.add_argument("--seed", type=int, default=0, help="seed of the (lr, wd) draws")
  p.add_argument("--print_commands", action="store_true",
                 help="print one command per trial instead of running them")
  a, overrides = p.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  try:
    if bad:
      raise errors.UserError(f"unknown arguments {' '.join(bad)}; overrides are "
                             "--config.FIELD=VALUE")
    rows = run(a.config, a.trials, a.workdir, overrides, a.seed, a.print_commands)
    if not a.print_commands:
      done = sum(r["status"] == "finished" for r in rows)
      print(f"{done}/{len(rows)} trials finished; tools/stability {a.workdir} reads them.")
  except errors.UserError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  main(sys.argv[1:])
