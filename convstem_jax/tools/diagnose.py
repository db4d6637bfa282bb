r"""Token and attention diagnostics of a run's checkpoint on real images, as JSON and PNG.

    python -m convstem_jax.tools.diagnose --workdir=W [--checkpoint=STEP] [--images=64] [--ema]
        [--heads=0,1,2] [--query=Y,X] [--map_images=2]
    python -m convstem_jax.tools.diagnose --compare W1 W2 ... --out=DIR [--labels=a,b,...]

For each run: the model is rebuilt from W/config.json, the checkpoint read (the latest,
or STEP), and the first N images of its first eval split (eval preprocessing) go
through it. Written to W/diagnostics/<step>/ (or --out): `diagnostics.json` (every
measure, layer by layer: convstem_jax/diagnostics/measures.py has the definitions),
one PNG per measure, `attention_maps_<i>.png` for the first --map_images images (where
the query patch --query, default the grid centre, attends, per block and head: the
first four heads, or --heads) and `curves.png` (loss, accuracy, learning rate).
`--compare` draws the runs together, one PNG per measure, labelled by run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import numpy as np
from etils import epath

from convstem_jax import checkpoint as ckpt_lib
from convstem_jax import config as config_lib
from convstem_jax import errors
from convstem_jax.diagnostics import figures, report
from convstem_jax.models import model_from_config
from convstem_jax.weights import load


def diagnose(workdir: str, checkpoint: str = "", images: int = 64, ema: bool = False,
             out: str = "", heads: Sequence[int] | int = 4,
             query: tuple[int, int] | None = None, map_images: int = 2) -> tuple[dict, str]:
  """Measures of one run; returns (result, output directory)."""
  config = config_lib.run_config(workdir)
  model = model_from_config(config).clone(scan_blocks=False)
  _, step = ckpt_lib.resolve(workdir, int(checkpoint) if checkpoint else None)
  variables = load.load_variables(str(epath.Path(workdir) / "checkpoints" / str(step)),
                                  model, ema=ema)
  variables.setdefault("batch_stats", {})
  x = report.eval_images(config, images)
  t0 = time.perf_counter()
  result = report.analyse(model, variables, x, keep_maps=map_images)
  result["seconds"] = time.perf_counter() - t0
  result.update(workdir=str(workdir), step=step, ema=ema, model=config.model_name)
  target = epath.Path(out or epath.Path(workdir) / "diagnostics" / str(step))
  target.mkdir(parents=True, exist_ok=True)
  maps = result.pop("_maps")
  (target / "diagnostics.json").write_text(json.dumps(result, indent=1))
  for measure in figures.MEASURES:
    figures.measure_figure({epath.Path(workdir).name: result}, measure,
                           target / f"{measure}.png")
  for i in range(min(map_images, len(x))):
    try:
      figures.attention_maps_figure({**result, "_maps": maps}, x[i],
                                    target / f"attention_maps_{i}.png", heads, query, i)
    except ValueError as e:
      raise errors.UserError(f"{e}; pass other --heads / --query.") from None
  figures.curves_figure([workdir], target / "curves.png")
  return result, str(target)


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", help="a training run's workdir")
  p.add_argument("--compare", nargs="+", default=(), help="several workdirs, drawn together")
  p.add_argument("--labels", default="", help="comma-separated names for --compare")
  p.add_argument("--checkpoint", default="", help="a step (default: the latest)")
  p.add_argument("--images", type=int, default=64, help="eval images to measure on")
  p.add_argument("--ema", action="store_true", help="the EMA weights")
  p.add_argument("--out", default="", help="output directory")
  p.add_argument("--heads", default="", help="heads to draw in the attention maps, e.g. "
                 "0,2,5 (default: the first four)")
  p.add_argument("--query", default="", help="the query patch Y,X of the attention maps "
                 "(default: the grid centre)")
  p.add_argument("--map_images", type=int, default=2, help="images with attention maps")
  a = p.parse_args(argv)
  try:
    try:
      heads = [int(h) for h in a.heads.split(",")] if a.heads else 4
      query = tuple(int(v) for v in a.query.split(",")) if a.query else None
    except ValueError:
      raise errors.UserError(f"--heads={a.heads} / --query={a.query}: comma-separated "
                             "integers, e.g. --heads=0,1 --query=2,3") from None
    if query is not None and len(query) != 2:
      raise errors.UserError(f"--query={a.query}: two integers Y,X")
    maps = dict(heads=heads, query=query, map_images=a.map_images)
    if not a.workdir and not a.compare:
      raise errors.UserError("pass --workdir=W, or --compare W1 W2 ... --out=DIR")
    if a.workdir:
      # --out is the comparison's directory when both are given
      result, where = diagnose(a.workdir, a.checkpoint, a.images, a.ema,
                               "" if a.compare else a.out, **maps)
      print(f"{a.workdir}: {result['images']} images, written to {where}")
      for i, layer in enumerate(result["layers"]):
        line = f"  {layer:9s} similarity {result['token_similarity'][i]:.3f}"
        if i:
          line += (f"  distance {np.mean(result['mean_attention_distance_px'][i - 1]):6.1f}"
                   f" px  entropy {np.mean(result['attention_entropy'][i - 1]):.2f}")
        print(line)
    if a.compare:
      if not a.out:
        raise errors.UserError("--compare needs --out=DIR for its figures")
      labels = a.labels.split(",") if a.labels else [epath.Path(w).name for w in a.compare]
      if len(labels) != len(a.compare):
        raise errors.UserError(f"{len(labels)} labels for {len(a.compare)} runs")
      results = {}
      for label, w in zip(labels, a.compare):
        results[label], _ = diagnose(w, "", a.images, a.ema,
                                     str(epath.Path(a.out) / label), **maps)
      for measure in figures.MEASURES:
        print(figures.measure_figure(results, measure, epath.Path(a.out) / f"{measure}.png"))
      print(figures.curves_figure(list(a.compare), epath.Path(a.out) / "curves.png", labels))
  except errors.UserError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  main(sys.argv[1:])
