"""What we learn from a run: TensorBoard events, metrics.jsonl, a progress line.

Process 0 writes; other processes only log. clu's writers are imported when a writer is
made, not at import, because they pull in TensorFlow (TensorBoard summaries), which
the models and the train step must not import.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath


def _plain(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


def read_records(workdir: epath.PathLike) -> list[dict[str, Any]]:
  """A run's metrics.jsonl as written by MetricsWriter, one dict per line ([] if none)."""
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
  """One `write(step, scalars)` per logged step -> TensorBoard + one jsonl line."""

  def __init__(self, workdir: str):
    from convstem_jax.data.files import import_tf  # pylint: disable=g-import-not-at-top
    import_tf()  # before clu's writers load TensorFlow: keep it off the accelerators
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    self.is_main = jax.process_index() == 0
    self.tb = metric_writers.create_default_writer(
        workdir, just_logging=not self.is_main, asynchronous=True)
    self.jsonl = epath.Path(workdir) / "metrics.jsonl" if self.is_main else None

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    scalars = {k: _plain(v) for k, v in scalars.items()}
    self.tb.write_scalars(step, scalars)
    if self.jsonl is not None:
      with self.jsonl.open("a") as f:
        f.write(json.dumps({"step": int(step), **scalars}) + "\n")

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    flat = {k: v for k, v in hparams.items() if isinstance(v, (int, float, str, bool))}
    self.tb.write_hparams(flat)

  def close(self) -> None:
    self.tb.flush()
    self.tb.close()


class Progress:
  """Images/s and ETA between log steps; the caller has already synced the device."""

  def __init__(self, total_steps: int, global_batch_size: int, start_step: int):
    self.total, self.batch = total_steps, global_batch_size
    self.t0 = self.t = time.perf_counter()
    self.step0 = self.last = start_step
    self.paused = 0.0

  def pause(self, seconds: float) -> None:
    """Time spent in evals/checkpoints, left out of the training throughput."""
    self.paused += seconds

  def update(self, step: int) -> dict[str, float]:
    """Rates since the last update; {} when no step ran since then."""
    if step == self.last:
      return {}
    now = time.perf_counter()
    dt = max(now - self.t - self.paused, 1e-9)
    rate = (step - self.last) * self.batch / dt
    steps_per_s = (step - self.last) / dt
    self.t, self.last, self.paused = now, step, 0.0
    eta = (self.total - step) / steps_per_s if steps_per_s > 0 else math.inf
    return {"images_per_sec": rate, "steps_per_sec": steps_per_s,
            "images_per_sec_per_device": rate / jax.device_count(), "eta_s": eta}

  @staticmethod
  def line(step: int, total: int, loss: float, rates: Mapping[str, float]) -> str:
    if not rates:
      return f"step {step}/{total}  loss {loss:.4f}"
    eta = rates["eta_s"]
    eta_s = "?" if not math.isfinite(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
    return (f"step {step}/{total}  loss {loss:.4f}  "
            f"{rates['images_per_sec']:.1f} img/s  ETA {eta_s}")


def log_parameter_overview(params) -> None:
  from clu import parameter_overview  # no TensorFlow here, but only needed once
  if jax.process_index() == 0:
    parameter_overview.log_parameter_overview(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
        include_stats=False)
  logging.info("Parameters: %s", f"{sum(x.size for x in jax.tree.leaves(params)):,}")
