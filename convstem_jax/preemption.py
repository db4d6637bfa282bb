"""Preemption: on SIGTERM or SIGUSR1, every host agrees on one step, saves it, and the
run exits with `PREEMPTED_EXIT_CODE` (75, EX_TEMPFAIL: "preempted, rerun me"). Rerunning
the same command on the same workdir resumes from that checkpoint.

Who notices the signal:
- With JAX's distributed runtime up (multi-host, `CONVSTEM_JAX_DISTRIBUTED=1`, or the
  `--coordinator_address` flags, even with one process), JAX's preemption service owns
  SIGTERM: its notifier tells every host, and
  `multihost_utils.reached_preemption_sync_point(step)`, asked at every step, turns True
  on the same step everywhere (the maximum step any host had passed, plus one). A Python
  SIGTERM handler installed after `jax.distributed.initialize` would disable it, so only
  SIGUSR1 (SLURM's `--signal`) gets a Python handler, which forwards it to our own
  SIGTERM. The `Watcher` must be the service's only caller: orbax's manager, which
  would ask too, is kept out (`checkpoint._Manager`).
- Without it (one process), a Python handler sets a flag that the loop reads at each
  step boundary.
Handlers are installed before the distributed runtime starts (`install`), so a signal
during imports, restore or compilation is not lost: it is honoured at the first step
boundary after it (with the runtime up, a notice that the service turned into a step
before this run's first one is caught by `_missed_sync_point`). A signal during an eval lets the eval finish; the save follows at
the end of that step or the next one.
"""

from __future__ import annotations

import logging
import os
import signal

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL; launch/slurm_example.sbatch and tpu.sh rerun on it
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: list[str] = []  # names of the signals seen, in order


class Preempted(Exception):
  """Raised by the trainer after the agreed step's checkpoint is committed."""

  def __init__(self, step: int, signal_name: str):
    super().__init__(f"Preempted ({signal_name}): checkpoint {step} is committed; rerun the "
                     "same command on the same workdir to resume from it.")
    self.step, self.signal_name = step, signal_name


def _service_on() -> bool:
  """True when JAX's preemption service runs (it owns SIGTERM)."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  state = distributed.global_state
  return state.client is not None and state.preemption_sync_manager is not None


def _on_signal(signum, frame):  # pylint: disable=unused-argument
  _received.append(signal.Signals(signum).name)
  if signum != signal.SIGTERM and _service_on():
    os.kill(os.getpid(), signal.SIGTERM)  # drive JAX's notifier, which reacts to SIGTERM


def install() -> None:
  """Python handlers for SIGTERM and SIGUSR1; call before jax.distributed.initialize."""
  for sig in SIGNALS:
    signal.signal(sig, _on_signal)


def after_distributed_init() -> None:
  """A SIGTERM that arrived before the preemption service started is handed to it."""
  if _service_on() and signal.SIGTERM.name in _received:
    os.kill(os.getpid(), signal.SIGTERM)


def received() -> str | None:
  """The first preemption signal this process got (None if none)."""
  return _received[0] if _received else None


# Keys of the preemption service in the coordination service's key-value store
# (xla/tsl/distributed_runtime/preemption/preemption_sync_manager.cc).
_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"
_COUNTER_DIR = "PREEMPTION_CURRENT_COUNTER/"


def _missed_sync_point(start_step: int, timeout_s: float = 30.0) -> int | None:
  """start_step + 1 if the service agreed on a step before this run's first one.

  A notice that arrives before any host has told the service its step (during restore
  or setup) makes the agreed step max(counters) + 1 = 1, which a run resuming at step s
  never reaches. Every host posted its counter once, and they read the same values, so
  they all decide alike: stop at the first step of this run.
  """
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  try:
    if client.key_value_try_get(_NOTICE_KEY) is None:
      return None
  except Exception:  # pylint: disable=broad-except
    return None  # no notice (the key is missing)
  deadline = time.monotonic() + timeout_s
  counters = []
  while time.monotonic() < deadline:
    counters = [int(v) for _, v in client.key_value_dir_get(_COUNTER_DIR)]
    if len(counters) >= jax.process_count():
      break
    time.sleep(0.05)
  else:
    logging.warning("A preemption notice arrived but not every host posted its step "
                    "within %.0fs; relying on the preemption service alone.", timeout_s)
    return None
  agreed = max(counters) + 1
  if agreed > start_step:
    return None  # still ahead: the service reports it
  logging.warning("A preemption notice arrived before the first step (the service agreed "
                  "on step %d); stopping at step %d instead.", agreed, start_step + 1)
  return start_step + 1


class Watcher:
  """`reached(step)` is True at the one step all hosts agreed to save and stop at.

  Call it at every step with increasing step numbers, starting with the step the run
  resumes from (the service's counter starts at 0, so a run that resumes at step s and
  is signalled during restore would otherwise agree on step 1, which it never reaches).
  """

  def __init__(self, start_step: int):
    import jax  # pylint: disable=g-import-not-at-top
    self.service = _service_on()
    if not self.service and jax.process_count() > 1:
      logging.warning("JAX's preemption service is off in a %d-process run: a preemption "
                      "signal cannot be agreed on, and the run relies on its periodic "
                      "checkpoints.", jax.process_count())
    self.multi = jax.process_count() > 1
    self.missed_step = None
    self.reached(start_step)
    if self.service:
      self.missed_step = _missed_sync_point(start_step)

  def reached(self, step: int) -> bool:
    if self.service:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return (multihost_utils.reached_preemption_sync_point(step)
              or step == self.missed_step)
    return not self.multi and bool(_received)

  @staticmethod
  def signal_name() -> str:
    return received() or "SIGTERM"
