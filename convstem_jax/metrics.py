"""What we learn from a run: TensorBoard events, metrics.jsonl, a progress line.

Process 0 writes; other processes only log. A run resumed at step s first drops the
records of steps after s (`MetricsWriter(resume_step=s)`): they came from work the
crash lost and the loop is about to redo, so every logged step is recorded once.
clu's writers are imported when a writer is made, not at import, because they pull in
TensorFlow (TensorBoard summaries), which the models and the train step must not import.
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


def _parse_lines(text: str) -> list[dict[str, Any]]:
  """jsonl rows; a last line cut short by a kill is dropped."""
  rows = []
  lines = [line for line in text.splitlines() if line.strip()]
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except ValueError:
      if i < len(lines) - 1:
        raise
  return rows


def read_records(workdir: epath.PathLike) -> list[dict[str, Any]]:
  """A run's metrics.jsonl as written by MetricsWriter, one dict per line ([] if none)."""
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return _parse_lines(path.read_text())


def truncate_jsonl(path: epath.Path, last_step: int) -> int:
  """Keeps the rows of steps <= last_step (atomically); returns how many it dropped."""
  if not path.exists():
    return 0
  old = path.read_text()
  rows = _parse_lines(old)
  keep = [r for r in rows if int(r.get("step", 0)) <= last_step]
  text = "".join(json.dumps(r) + "\n" for r in keep)
  if text != old:
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic, over the old file
  return len(rows) - len(keep)


def truncate_events(workdir: epath.Path, last_step: int) -> int:
  """Drops TensorBoard summaries of steps > last_step (all of them when last_step is 0,
  where the hparams are written again) from the workdir's event files; returns how many.

  Each file is rewritten only if it changes (to a temporary name, then renamed); a
  record cut short by a kill ends the file.
  """
  files = sorted(workdir.glob("events.out.tfevents*"))
  if not files:
    return 0
  from convstem_jax.data.files import import_tf  # pylint: disable=g-import-not-at-top
  tf = import_tf()
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  dropped = 0
  for path in files:
    records, cut = [], False
    try:
      for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        records.append(raw)
    except tf.errors.DataLossError:
      cut = True
    keep = []
    for raw in records:
      event = event_pb2.Event.FromString(raw)
      late = event.HasField("summary") and (event.step > last_step or last_step == 0)
      if not late:
        keep.append(raw)
    if len(keep) == len(records) and not cut:
      continue
    dropped += len(records) - len(keep)
    tmp = str(path) + ".tmp"
    with tf.io.TFRecordWriter(tmp) as w:
      for raw in keep:
        w.write(raw)
    tf.io.gfile.rename(tmp, str(path), overwrite=True)
  return dropped


class MetricsWriter:
  """One `write(step, scalars)` per logged step -> TensorBoard + one jsonl line."""

  def __init__(self, workdir: str, resume_step: int | None = None):
    from convstem_jax.data.files import import_tf  # pylint: disable=g-import-not-at-top
    import_tf()  # before clu's writers load TensorFlow: keep it off the accelerators
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    self.is_main = jax.process_index() == 0
    self.jsonl = epath.Path(workdir) / "metrics.jsonl" if self.is_main else None
    if self.is_main and resume_step is not None:
      rows = truncate_jsonl(self.jsonl, resume_step)
      events = truncate_events(epath.Path(workdir), resume_step)
      if rows or events:
        logging.info("Dropped the records after step %d (%d metrics.jsonl rows, %d "
                     "TensorBoard summaries): the run redoes those steps.", resume_step,
                     rows, events)
    self.tb = metric_writers.create_default_writer(
        workdir, just_logging=not self.is_main, asynchronous=True)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    scalars = {k: _plain(v) for k, v in scalars.items()}
    self.tb.write_scalars(step, scalars)
    if self.jsonl is not None:
      with self.jsonl.open("a") as f:
        f.write(json.dumps({"step": int(step), **scalars}) + "\n")

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """HxWx3 uint8 pictures, to TensorBoard only."""
    self.tb.write_images(step, {k: v[None] for k, v in images.items()})

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    flat = {k: v for k, v in hparams.items() if isinstance(v, (int, float, str, bool))}
    self.tb.write_hparams(flat)

  def flush(self) -> None:
    """Every row written so far is on disk (TensorBoard's asynchronous queue too)."""
    self.tb.flush()

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
    return (f"step {step}/{total}  loss {loss:.4f}  "
            f"{rates['images_per_sec']:.1f} img/s  ETA {format_duration(rates['eta_s'])}")


def format_duration(seconds: float) -> str:
  """'1d 02:03:04' for multi-day runs, '02:03:04' below a day, '?' when unknown."""
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  days, rest = divmod(int(round(seconds)), 86400)
  hours, rest = divmod(rest, 3600)
  clock = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
  return f"{days}d {clock}" if days else clock


def log_parameter_overview(params) -> None:
  from clu import parameter_overview  # no TensorFlow here, but only needed once
  if jax.process_index() == 0:
    parameter_overview.log_parameter_overview(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
        include_stats=False)
  logging.info("Parameters: %s", f"{sum(x.size for x in jax.tree.leaves(params)):,}")
