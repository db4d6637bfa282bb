"""Diagnostics during training: at every eval step when `config.diagnostics_images` > 0.

The first `diagnostics_images` images of the first eval split (eval preprocessing, read
once) go through the model with the weights being trained (not the EMA); the measures
of `report.analyse` become scalars `diagnostics/<measure>/<layer>` in metrics.jsonl and
TensorBoard (per-head measures averaged over heads), the whole result is written to
W/diagnostics/<step>/diagnostics.json and the attention maps of the centre query to
W/diagnostics/<step>/attention_maps.png and TensorBoard (`diagnostics/attention_maps`).
Nothing here touches the train state or its random keys: a run with diagnostics
trains exactly as one without. A step redone after a resume rewrites its files.
"""

from __future__ import annotations

import json
import logging
import time

import jax
import matplotlib.image
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from convstem_jax.diagnostics import figures, report
from convstem_jax.weights import core, load


class TrainingDiagnostics:
  """`run(step, params, batch_stats)` -> (scalars, {name: HxWx3 uint8 image})."""

  def __init__(self, config, model, workdir: str):
    self.model = model.clone(scan_blocks=False)
    self.scanned, self.depth = model.scan_blocks, model.depth
    self.images = report.eval_images(config, config.diagnostics_images)
    self.root = epath.Path(workdir) / "diagnostics"
    self.is_main = jax.process_index() == 0

  def _host_variables(self, params, batch_stats) -> dict:
    # Every process takes part in the gather (the weights may be sharded over hosts);
    # the measures then run on process 0's devices only.
    variables = multihost_utils.process_allgather(
        {"params": params, "batch_stats": batch_stats}, tiled=True)
    if self.scanned:
      flat = core.flatten(variables)
      conv = core.Converted(flat, {k: k for k in flat})
      load.to_layout(conv, scanned=False, depth=self.depth)
      variables = core.unflatten(conv.tensors)
    variables.setdefault("batch_stats", {})
    return variables

  def run(self, step: int, params, batch_stats) -> tuple[dict[str, float], dict]:
    variables = self._host_variables(params, batch_stats)
    if not self.is_main:
      return {}, {}
    t0 = time.perf_counter()
    result = report.analyse(self.model, variables, self.images)
    maps = result.pop("_maps")
    target = self.root / str(step)
    target.mkdir(parents=True, exist_ok=True)
    (target / "diagnostics.json").write_text(json.dumps({**result, "step": step}, indent=1))
    png = figures.attention_maps_figure({**result, "_maps": maps}, self.images[0],
                                        target / "attention_maps.png")
    picture = matplotlib.image.imread(png)[..., :3]
    picture = (np.clip(picture, 0, 1) * 255).astype(np.uint8)
    logging.info("Diagnostics of %d images at step %d in %.1fs, written to %s.",
                 result["images"], step, time.perf_counter() - t0, target)
    return report.scalars(result), {"diagnostics/attention_maps": picture}
