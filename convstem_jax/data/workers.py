"""The train and eval streams in worker processes pinned one per core, each making its
rows of every batch.

Why: on the 2-core VM of docs/benchmarks.md one tf.data process on two cores made 518-587
train images/s, while two one-thread processes pinned one per core made 652-653 together
(2.0x one core): inside one process tf.data's threads, the consumer and each image's
buffers move between the cores. `config.data_workers` = N > 0 runs N such processes
(`python -m convstem_jax.data.workers`) for file sources, worker w pinned to the w-th
core this process may use (round robin) with one tf.data thread. Batch rows are split in
N contiguous ranges; worker w makes rows [lo_w, hi_w) of every batch with the source's
own per-example stream (same positions, same seeds), so the batches are bitwise those of
the in-process stream (tests/test_data.py), resumes included.

Eval: one `EvalWorkers` per source, started at its first eval pass and kept for the
next ones (starting N processes and TensorFlow for every pass would cost more than they
gain). Each worker makes its rows of every eval batch, pass after pass; the pass's last,
short batch has the rows of the workers whose range it reaches. A pass broken off
(preemption during eval) is read to its end before the next one starts.

Hand-over: each worker writes its rows into one of a few slots of an anonymous shared
memory file (memfd, Linux) and sends the slot number over a pipe; the parent copies the
rows out into the batch (one copy, so nothing it yields aliases a slot) and sends the
slot back. Workers ignore SIGINT, SIGTERM and the preemption signals (the trainer owns
those and needs its input until it has saved), exit when their pipe closes, and are
killed when the thread that started them ends (PR_SET_PDEATHSIG; the trainer's main
thread). A worker that fails prints its traceback and the parent raises.
"""

from __future__ import annotations

import atexit
import functools
import json
import mmap
import os
import pickle
import signal
import subprocess
import sys
from typing import Iterator

import numpy as np

SLOTS = 3  # per worker: one being written, one being read, one spare
_RUNNING: set[subprocess.Popen] = set()


def row_ranges(batch_size: int, workers: int) -> list[tuple[int, int]]:
  """[lo, hi) of each worker's rows: contiguous, as even as can be, none empty."""
  workers = max(1, min(workers, batch_size))
  edges = [batch_size * w // workers for w in range(workers + 1)]
  return list(zip(edges[:-1], edges[1:]))


def _layout(keys: dict) -> tuple[dict, int]:
  """{key: (offset, shape, dtype)} of one slot, and the slot's size in bytes."""
  out, offset = {}, 0
  for k, (shape, dtype) in sorted(keys.items()):
    dtype = np.dtype(dtype)
    out[k] = (offset, tuple(shape), dtype)
    offset += -(-int(np.prod(shape, dtype=np.int64)) * dtype.itemsize // 64) * 64
  return out, max(offset, 1)


def _views(buf, layout: dict, slot_bytes: int, slot: int, rows: int) -> dict:
  return {k: np.ndarray((rows, *shape[1:]), dtype, buf, slot * slot_bytes + offset)
          for k, (offset, shape, dtype) in layout.items()}


def _kill(proc: subprocess.Popen, running: set) -> None:
  """Close the worker's pipe (it exits), then kill it if it has not within 5 s."""
  try:
    proc.stdin.close()
  except OSError:
    pass
  try:
    proc.wait(timeout=5)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
  proc.stdout.close()
  running.discard(proc)


@atexit.register
def _kill_all() -> None:
  for proc in list(_RUNNING):
    _kill(proc, _RUNNING)


class _Worker:
  """One worker process, seen from the parent."""

  def __init__(self, task: dict, core: int | None):
    env = dict(os.environ, CONVSTEM_WORKER_CORE="" if core is None else str(core))
    self.proc = subprocess.Popen([sys.executable, "-m", "convstem_jax.data.workers"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    _RUNNING.add(self.proc)
    payload = pickle.dumps(task)
    self.proc.stdin.write(len(payload).to_bytes(8, "little") + payload)
    self.proc.stdin.flush()
    self.buf = None
    self._kill = functools.partial(_kill, self.proc, _RUNNING)  # usable at shutdown too

  def _line(self) -> str:
    line = self.proc.stdout.readline().decode()
    if not line:
      rc = self.proc.wait()
      raise RuntimeError(f"Input worker process {self.proc.pid} exited (code {rc}) "
                         "before its rows of the batch; its error is printed above.")
    return line

  def wait_ready(self) -> None:
    """Read the first message, where the slots are (it comes with the first batch)."""
    if self.buf is None:
      message = json.loads(self._line())
      with open(message["path"], "r+b") as f:
        self.layout, self.slot_bytes = _layout(message["keys"])
        self.buf = mmap.mmap(f.fileno(), self.slot_bytes * SLOTS)

  def next_rows(self) -> tuple[int, dict]:
    """(slot, views of this worker's rows of the next batch)."""
    self.wait_ready()
    message = json.loads(self._line())
    return message["slot"], _views(self.buf, self.layout, self.slot_bytes,
                                   message["slot"], message["rows"])

  def free(self, slot: int) -> None:
    self.proc.stdin.write(f"{slot}\n".encode())
    self.proc.stdin.flush()

  def close(self) -> None:
    self._kill()


def _start(task: dict, ranges: list[tuple[int, int]]) -> list[_Worker]:
  """One worker per row range, running `task` (see `_stream`), pinned round robin."""
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  return [_Worker(dict(task, rows=r), cores[w % len(cores)] if cores else None)
          for w, r in enumerate(ranges)]


def _next_batch(procs: list[_Worker]) -> dict:
  """The next batch: the rows of each of `procs`, in order, copied out of their slots."""
  parts = [(w, *w.next_rows()) for w in procs]
  batch = {k: np.concatenate([views[k] for _, _, views in parts]) for k in parts[0][2]}
  for w, slot, _ in parts:
    w.free(slot)
  return batch


def batches(task: dict, workers: int) -> Iterator[dict]:
  """The endless train batches made by `workers` pinned processes, each running `task`
  (see `_stream`) on its row range."""
  procs = _start(task, row_ranges(task["batch_size"], workers))
  try:
    while True:
      yield _next_batch(procs)
  finally:
    for w in procs:
      w.close()


class EvalWorkers:
  """Workers making a source's eval passes, batch after batch, for as many passes as
  asked. `task` has the source and `batch_size`; the source's `local` examples make one
  pass (short last batch, no padding: the caller pads)."""

  def __init__(self, task: dict, workers: int):
    self.examples, self.batch_size = len(task["source"].local), task["batch_size"]
    assert self.examples > 0, "a process with no eval examples needs no workers"
    self.ranges = row_ranges(min(self.batch_size, self.examples), workers)
    self.procs = _start(dict(task, eval=True), self.ranges)
    self.key = (self.batch_size, workers)  # what the source asked for
    self.unread = 0  # batches of the last pass not read yet
    self.closed = False

  def _closing_on_failure(self, read):
    try:
      return read()
    except BaseException:
      self.close()  # a worker failed, or the workers' streams are out of step now
      raise

  def _batch(self, index: int) -> dict:
    rows = min(self.batch_size, self.examples - index * self.batch_size)
    return self._closing_on_failure(lambda: _next_batch(
        [w for w, (lo, _) in zip(self.procs, self.ranges) if lo < rows]))

  def template(self) -> dict:
    """{key: (per-example shape, dtype)}, as the workers' first batch has them."""
    for w in self.procs:
      self._closing_on_failure(w.wait_ready)
    return {k: (shape[1:], dtype) for k, (_, shape, dtype) in self.procs[0].layout.items()}

  def one_pass(self) -> Iterator[dict]:
    num = -(-self.examples // self.batch_size)
    for index in range(num - self.unread, num):  # what a broken-off pass left
      self._batch(index)
    self.unread = num
    for index in range(num):
      self.unread -= 1
      yield self._batch(index)

  def close(self) -> None:
    self.closed = True
    for w in self.procs:
      w.close()


# ------------------------------------------------------------------ the worker side


def _stream(task: dict):
  """This worker's batches of its rows: numpy dicts, from the source's own stream."""
  from convstem_jax.data import files  # pylint: disable=g-import-not-at-top
  tf = files.import_tf()
  source = task["source"]
  source.config = files.one_thread(source.config)
  rows = task["rows"][1] - task["rows"][0]
  if task.get("eval"):  # pass after pass; each pass's last batch may be short
    ds = source.eval_dataset(tf, task["batch_size"], task["rows"])
    ds = ds.batch(rows).repeat().prefetch(1)
  else:
    ds = source.train_dataset(tf, task["batch_size"], task["start_step"], task["process"],
                              rows=task["rows"])
    ds = ds.batch(rows, drop_remainder=True).prefetch(1)
  ds = ds.with_options(files.options(tf, source.config))
  return ({k: b[k] for k in ("image", "label")} for b in ds.as_numpy_iterator())


def _work() -> None:
  for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
  try:  # die with the parent (Linux)
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass
  core = os.environ.pop("CONVSTEM_WORKER_CORE", "")
  if core and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {int(core)})  # before TensorFlow starts its threads
  commands = sys.stdin.buffer
  size = int.from_bytes(commands.read(8), "little")
  task = pickle.loads(commands.read(size))
  out = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)  # anything else printed goes to stderr, not into the protocol
  buf, free = None, list(range(SLOTS))
  for batch in _stream(task):
    if buf is None:
      keys = {k: [[v.shape[0], *v.shape[1:]], v.dtype.str] for k, v in batch.items()}
      layout, slot_bytes = _layout(keys)
      # An anonymous memory file: the parent opens it through /proc, and it goes with
      # the last mapping, so no crash leaves it behind.
      fd = os.memfd_create("convstem_input")
      os.ftruncate(fd, slot_bytes * SLOTS)
      buf = mmap.mmap(fd, slot_bytes * SLOTS)
      path = f"/proc/{os.getpid()}/fd/{fd}"
      out.write(json.dumps({"path": path, "keys": keys}) + "\n")
      out.flush()
    if not free:
      line = commands.readline()
      if not line:
        return  # the parent is done with us
      free.append(int(line))
    slot = free.pop(0)
    rows = len(batch["label"])
    for k, view in _views(buf, layout, slot_bytes, slot, rows).items():
      view[...] = batch[k]
    out.write(json.dumps({"slot": slot, "rows": rows}) + "\n")
    out.flush()


if __name__ == "__main__":
  _work()
