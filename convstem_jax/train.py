"""The training loop, top to bottom.

    setup -> mesh -> data -> model and optimizer (born sharded) -> update step
          -> restore (workdir, else config.init_from, else fresh) -> records
          -> loop (log, eval [+ diagnostics], checkpoint, NaN guard, preemption)

Every array in the state is a global `jax.Array` sharded over the mesh, so the same code
runs on one CPU, a GPU node and a TPU pod slice, and orbax can save it from every host.
The step is compiled once; the host reads results from the device only at log steps,
and runs at most `STEPS_AHEAD` steps ahead of it, so a preemption signal is honoured
within a few steps' time, not at the next log step.

A run can stop anywhere and continue exactly. Each step's batch and random keys are a
function of (seed, step), so a run killed at any moment and restarted on the same
workdir (same device count) ends bitwise equal to one never interrupted. On SIGTERM or
SIGUSR1 the hosts agree on a step, save it, wait for the commit and raise
`preemption.Preempted` (main exits 75). Records follow the checkpoint: on resume,
metrics.jsonl and TensorBoard lose the steps after the restored one (they are about to
be redone), and a metrics row is on disk before the checkpoint that would skip it.
Every exit path waits for an in-flight save.
`plan_state`, `make_init_state`, `make_train_step` and `jit_train_step` build the state
and the step; `tools/benchmark.py` uses them too, so it times the very step trained here.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from convstem_jax import checkpoint as ckpt_lib
from convstem_jax import config as config_lib
from convstem_jax import data as data_lib
from convstem_jax import errors
from convstem_jax import evaluate as eval_lib
from convstem_jax import metrics as metrics_lib
from convstem_jax import optim
from convstem_jax import preemption
from convstem_jax import sharding as shd
from convstem_jax import weights
from convstem_jax.data import mixup as mixup_lib
from convstem_jax.models import model_from_config


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema: Any           # {"params", "batch_stats"} averaged weights, or {} when EMA is off
  rng: jax.Array

  def as_dict(self) -> dict[str, Any]:
    return {f: getattr(self, f) for f in self.__dataclass_fields__}


class Durations(NamedTuple):
  """The run's length and cadences in trainer steps (0 = never)."""
  steps_per_epoch: int
  total_steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int


def durations(config, num_train_examples: int) -> Durations:
  """Steps per epoch (whole global batches), the run's length (config.total_steps or
  total_epochs, one of them) and its cadences, as the trainer uses them."""
  if num_train_examples < config.batch_size:
    raise errors.UserError(
        f"The '{config.train_split}' split has {num_train_examples} examples, fewer than "
        f"one batch of {config.batch_size}; lower --config.batch_size.")
  steps_per_epoch = num_train_examples // config.batch_size
  total = config_lib.duration(config, "total", steps_per_epoch)
  if not total:
    raise errors.UserError("Set config.total_steps or config.total_epochs to a positive "
                           "value.")
  if config.log_every_steps <= 0:
    raise errors.UserError(f"config.log_every_steps must be positive, got "
                           f"{config.log_every_steps}.")
  return Durations(steps_per_epoch, total, config.log_every_steps,
                   config_lib.duration(config, "eval_every", steps_per_epoch),
                   config_lib.duration(config, "checkpoint_every", steps_per_epoch))


def check_workdir(workdir: str) -> None:
  """A workdir must be a directory (or not exist yet); a file there is a mistake."""
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise errors.UserError(f"--workdir={workdir} is a file, not a directory; pass a "
                           "directory (it is created if missing).")
  if (path / "checkpoints").exists() and not (path / "checkpoints").is_dir():
    raise errors.UserError(f"{path / 'checkpoints'} is a file; the workdir's checkpoints "
                           "go there: move it away or use another --workdir.")


def write_config(config, workdir: str, start: int) -> None:
  """config.json is the run's config: written once the start is known to be valid.

  A resumed run with another config keeps the first one, says what changed and leaves
  its own config beside it as config.<start step>.json.
  """
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir) / "config.json"
  text = config.to_json_best_effort(indent=2)
  if start == 0 or not path.exists():
    path.write_text(text)
    return
  try:
    before = json.loads(path.read_text())
  except ValueError:
    before = None
  changes = _config_changes(before, json.loads(text)) if before is not None else ["(unreadable)"]
  if changes:
    (epath.Path(workdir) / f"config.{start}.json").write_text(text)
    logging.warning("Resuming at step %d with a config that differs from config.json (kept "
                    "as the run's): %s; this run's config is in config.%d.json.", start,
                    "; ".join(changes[:20]) + (" ..." if len(changes) > 20 else ""), start)


def _config_changes(before, after, prefix: str = "") -> list[str]:
  if isinstance(before, dict) and isinstance(after, dict):
    out = []
    for k in sorted(set(before) | set(after)):
      out += _config_changes(before.get(k), after.get(k), f"{prefix}{k}.")
    return out
  return [] if before == after else [f"{prefix[:-1]}: {before!r} -> {after!r}"]


# ------------------------------------------------ state and step builders (reused by
# tools/benchmark.py, so the benchmark times exactly the step the trainer runs)


def make_init_state(model, tx: optax.GradientTransformation, use_ema: bool):
  """init_state(rng) -> a fresh TrainState; jit it with `out_shardings` so the state
  is born sharded."""
  def init_state(rng) -> TrainState:
    init_images = jnp.zeros((1, model.img_size, model.img_size, 3), jnp.float32)
    init_rng, state_rng = jax.random.split(rng)
    variables = model.init(init_rng, init_images, train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    ema = {"params": params, "batch_stats": batch_stats} if use_ema else {}
    return TrainState(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params),
                      ema, state_rng)
  return init_state


class StatePlan(NamedTuple):
  """Everything about the train state before any array exists."""
  tx: optax.GradientTransformation
  schedule: optax.Schedule          # lr of the trainer step
  ema_decay: Callable | None        # EMA decay of the trainer step, None = no EMA
  init_state: Callable              # rng -> a fresh TrainState
  abstract_state: TrainState        # shapes and dtypes
  state_sharding: TrainState        # NamedShardings of every leaf


def plan_state(config, model, mesh, steps_per_epoch: int, total_steps: int) -> StatePlan:
  """The optimizer, schedules, init function, abstract state and shardings. jit
  `init_state` with `out_shardings=state_sharding` for a fresh state, or restore onto the
  shardings."""
  init_images = jnp.zeros((1, model.img_size, model.img_size, 3), jnp.float32)
  rng = jax.random.PRNGKey(0)  # shapes only
  abstract_vars = jax.eval_shape(lambda: model.init(rng, init_images))
  tx, schedule = optim.make_optimizer(config, abstract_vars["params"], steps_per_epoch,
                                      total_steps)
  ema_decay = optim.ema_schedule(config, steps_per_epoch, total_steps)
  init_state = make_init_state(model, tx, ema_decay is not None)
  abstract_state = jax.eval_shape(init_state, rng)
  state_sharding = shd.state_shardings(abstract_state, mesh, config_lib.get(config, "fsdp"))
  return StatePlan(tx, schedule, ema_decay, init_state, abstract_state, state_sharding)


def make_train_step(config, model, plan: StatePlan):
  """The update step, not yet jitted: train_step(state, batch) -> (state, metrics).

  Mixup / CutMix (on the global batch), gradient accumulation over micro-batches, the
  optax update, EMA and the step's metrics, all from `config`.

  Gradient accumulation and BatchNorm: each micro-batch is normalised with its own
  batch statistics (as a "ghost batch" of batch_size / grad_accum_steps), so a BatchNorm
  model does not compute the same function as with one big batch; the running
  statistics advance once per step, by the mean of the micro-batches' updates (for the
  mean, exactly the big batch's mean), so their momentum per step stays 0.9.
  """
  tx, schedule, ema_decay = plan.tx, plan.schedule, plan.ema_decay
  accum = max(1, config.grad_accum_steps)
  if config.batch_size % (accum * jax.device_count()):
    raise errors.UserError(
        f"grad_accum_steps={accum} micro-batches of a global batch of {config.batch_size} "
        f"do not split evenly over {jax.device_count()} devices; make batch_size a "
        "multiple of grad_accum_steps x devices.")
  smoothing = config_lib.get(config, "label_smoothing")
  use_mixing = mixup_lib.enabled(config)  # mixup / CutMix inside the step (data/mixup.py)

  def loss_fn(params, batch_stats, batch, rng):
    (logits, _), new_vars = model.apply(
        {"params": params, "batch_stats": batch_stats}, batch["image"], train=True,
        mutable=["batch_stats"], rngs={"dropout": rng})
    if "targets" in batch:  # mixup / CutMix: mixed soft targets, smoothing already in
      targets = batch["targets"]
    else:
      targets = optim.smooth_labels(jax.nn.one_hot(batch["label"], logits.shape[-1]),
                                    smoothing)
    loss = optim.softmax_cross_entropy(logits, targets)
    # Against the argmax of the targets: the label itself, or under mixup / CutMix the
    # dominant one (the larger of lam and 1 - lam), so train/accuracy stays comparable
    # across steps but reads lower than an unmixed accuracy.
    correct = jnp.argmax(logits, -1) == jnp.argmax(targets, -1)
    return loss.mean(), (new_vars.get("batch_stats", {}), correct.mean())

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    mix_metrics = {}
    if use_mixing:  # on the whole global batch, before any micro-batch split
      rng, mix_rng = jax.random.split(rng)
      one_hot = jax.nn.one_hot(batch["label"], model.num_classes)
      images, targets, info = mixup_lib.mix_from_config(config, mix_rng, batch["image"],
                                                        one_hot)
      batch = {**batch, "image": images, "targets": targets}
      mix_metrics = {"train/mix_lam": info["lam"],
                     "train/cutmix": info["cutmix"].astype(jnp.float32)}
    if accum == 1:
      (loss, (batch_stats, acc)), grads = grad_fn(state.params, state.batch_stats, batch,
                                                  rng)
    else:
      # Micro-batch j holds examples j, j+accum, ..., so each one stays spread over all
      # devices. Every micro-batch starts from the step's running statistics; their
      # updates are averaged below (one BatchNorm update per step).
      micro = jax.tree.map(
          lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1),
          batch)

      def body(carry, mb_and_i):
        grads, stats_sum, loss, acc = carry
        mb, i = mb_and_i
        (l, (stats, a)), g = grad_fn(state.params, state.batch_stats, mb,
                                     jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, stats_sum, stats),
                loss + l, acc + a), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      zero_stats = jax.tree.map(jnp.zeros_like, state.batch_stats)
      (grads, stats_sum, loss, acc), _ = jax.lax.scan(
          body, (zeros, zero_stats, 0.0, 0.0), (micro, jnp.arange(accum)))
      grads, loss, acc = jax.tree.map(lambda g: g / accum, grads), loss / accum, acc / accum
      batch_stats = jax.tree.map(lambda s: s / accum, stats_sum)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema_decay is not None:
      ema = optim.ema_update(ema, {"params": params, "batch_stats": batch_stats},
                             ema_decay(state.step))
    metrics = {"train/loss": loss, "train/accuracy": acc,
               "train/grad_norm": optax.tree.norm(grads),
               "train/param_norm": optax.tree.norm(params),
               "train/lr": schedule(state.step), **mix_metrics}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, ema=ema)
    return new_state, metrics
  return train_step


def jit_train_step(train_step, state_sharding, mesh):
  """The compiled step as the trainer runs it: the state is donated (updated in place),
  batches are split over the mesh, metrics come back replicated."""
  return jax.jit(train_step, donate_argnums=0,
                 in_shardings=(state_sharding, shd.batch_sharding(mesh)),
                 out_shardings=(state_sharding, shd.replicated(mesh)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from the workdir's newest readable checkpoint) and returns the
  final evals. Raises `preemption.Preempted` after saving on SIGTERM / SIGUSR1."""
  # ---------------------------------------------------------------- setup
  model = model_from_config(config)  # a bad model name fails before anything is written
  check_workdir(workdir)
  logging.info("Process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)

  # ---------------------------------------------------------------- mesh
  mesh = shd.make_mesh(config.mesh)
  local_bs = shd.local_batch_size(config.batch_size)

  # ---------------------------------------------------------------- data
  train_source = data_lib.get_source(config, config.train_split)
  run = durations(config, train_source.num_examples)
  steps_per_epoch, total_steps = run.steps_per_epoch, run.total_steps
  logging.info("%s: %d train examples, %d steps/epoch, %d steps of global batch %d",
               config.dataset, train_source.num_examples, steps_per_epoch, total_steps,
               config.batch_size)
  if config.dataset == "synthetic":
    logging.warning("Training on synthetic data (class-coloured noise): this checks the "
                    "machinery, not a recipe.")

  # ------------------------------------------------- model and optimizer, born sharded
  root_rng = jax.random.PRNGKey(config.seed)
  plan = plan_state(config, model, mesh, steps_per_epoch, total_steps)

  # ---------------------------------------------------------------- update step
  train_step = jit_train_step(make_train_step(config, model, plan), plan.state_sharding,
                              mesh)

  # ---------------------------------------------------------------- evaluators
  evaluator = eval_lib.Evaluator(config, model, mesh, train_source=train_source)
  diagnostics = None
  if config_lib.get(config, "diagnostics_images"):  # imported only then: it loads matplotlib
    from convstem_jax.diagnostics import training as diagnostics_lib  # pylint: disable=g-import-not-at-top
    diagnostics = diagnostics_lib.TrainingDiagnostics(config, model, workdir)

  # ------------------------------------- restore: workdir, else init_from, else fresh
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  checkpointer = ckpt_lib.Checkpointer(workdir, config.max_to_keep)
  abstract_sharded = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      plan.abstract_state, plan.state_sharding)
  t0 = time.perf_counter()
  restored = checkpointer.restore_newest_readable(abstract_sharded.as_dict())
  if restored is not None:
    start, state = restored[0], TrainState(**restored[1])
    logging.info("Resumed from checkpoint %s/%d (%.1fs) on %d devices.",
                 checkpointer.directory, start, time.perf_counter() - t0,
                 jax.device_count())
  else:
    start = 0
    state = jax.jit(plan.init_state, out_shardings=plan.state_sharding)(root_rng)
    if config.init_from:
      state = weights.init_from(config, model, state, plan.state_sharding)
  metrics_lib.log_parameter_overview(state.params)
  if start >= total_steps:
    logging.info("Checkpoint step %d already reaches total_steps %d.", start, total_steps)

  # ---------------------------------------------------------------- records
  # The start is valid: now the config is recorded, and the records lose the steps after
  # `start`, which the loop is about to redo.
  write_config(config, workdir, start)
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start)
  if start == 0:
    writer.write_hparams(dict(config.to_dict()))

  # ---------------------------------------------------------------- loop
  try:
    return _loop(config, workdir, state, start, run, train_step, train_source, local_bs,
                 mesh, evaluator, diagnostics, checkpointer, writer)
  finally:  # whatever ends the loop, an in-flight save is committed first
    try:
      checkpointer.close()
    finally:
      writer.close()


# How many dispatched steps may be unfinished on the device. Unbounded, the host would
# queue every step up to the next log step; a signal then waits for all of them (100
# slow steps can outlast a 30 s preemption grace period) before the save can start.
# Two keeps the device fed: while it runs one step, the next is already queued.
STEPS_AHEAD = 2


def _loop(config, workdir, state, start, run: Durations, train_step, train_source,
          local_bs, mesh, evaluator, diagnostics, checkpointer, writer):
  """Steps start+1 .. total_steps; the run's records and checkpoints along the way."""
  total_steps, log_every = run.total_steps, run.log_every
  eval_every, ckpt_every = run.eval_every, run.checkpoint_every
  watcher = preemption.Watcher(start)
  progress = metrics_lib.Progress(total_steps, config.batch_size, start)
  batches = train_source.train_batches(local_bs, start_step=start)
  profile = config.profile_steps  # (first step, number of steps)
  pending: list[dict[str, jax.Array]] = []
  results: dict[str, float] = {}

  for step in range(start + 1, total_steps + 1):
    if profile and step == profile[0] and jax.process_index() == 0:
      jax.profiler.start_trace(str(epath.Path(workdir) / "profile"))
    local = next(batches)
    if step == start + 1:
      check_batch_shape(config, local)
    state, step_metrics = train_step(state, shd.global_batch(local, mesh))
    pending.append(step_metrics)
    if len(pending) > STEPS_AHEAD:  # bounded run-ahead; the device still has work queued
      jax.block_until_ready(pending[-STEPS_AHEAD - 1])
    if step == start + 1:  # one wait, so compile time stays out of the throughput
      jax.block_until_ready(step_metrics)
      logging.info("First step (compilation included) done in %.1fs.",
                   time.perf_counter() - progress.t0)
      progress = metrics_lib.Progress(total_steps, config.batch_size, step)
    if profile and step == profile[0] + profile[1] - 1 and jax.process_index() == 0:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()

    is_last = step == total_steps
    preempted = watcher.reached(step) and not is_last
    is_eval = is_last or (eval_every and step % eval_every == 0)
    is_ckpt = is_last or preempted or (ckpt_every and step % ckpt_every == 0)
    if not (is_eval or is_ckpt or step % log_every == 0):
      continue

    # Log step: the only place the host waits for the device. Checkpoint and eval steps
    # are log steps too, so a NaN is caught before it is saved.
    history = jax.device_get(pending)
    pending = []
    check_finite(history, step - len(history) + 1, checkpointer)
    scalars = {k: float(np.mean([h[k] for h in history])) for k in history[-1]}
    scalars["train/lr"] = float(history[-1]["train/lr"])
    rates = progress.update(step)
    if rates:  # none right after the (compiling) first step
      scalars.update({f"train/{k}": v for k, v in rates.items() if k != "eta_s"})
    logging.info(metrics_lib.Progress.line(step, total_steps, scalars["train/loss"], rates))

    t0 = time.perf_counter()
    if is_eval:
      results = evaluator.run(state.params, state.batch_stats, state.ema)
      scalars.update(results)
      logging.info("step %d eval: %s", step, ", ".join(
          f"{k} {v:.4f}" for k, v in sorted(results.items())))
      if diagnostics is not None:
        diag_scalars, pictures = diagnostics.run(step, state.params, state.batch_stats)
        scalars.update(diag_scalars)
        writer.write_images(step, pictures)
    writer.write(step, scalars)
    if is_ckpt:
      # The rows up to this step are on disk before the checkpoint that a resumed run
      # would start after: a crash can redo a row, never lose it.
      writer.flush()
      t_save = time.perf_counter()
      checkpointer.save(step, state.as_dict())
      logging.info("Checkpoint %d started in %.2fs (written in the background).", step,
                   time.perf_counter() - t_save)
    progress.pause(time.perf_counter() - t0)
    if preempted:
      checkpointer.wait()
      name = preemption.Watcher.signal_name()
      logging.warning("%s: stopped at step %d; checkpoint %d is committed in %s.", name,
                      step, step, checkpointer.directory)
      raise preemption.Preempted(step, name)
  return results


def check_batch_shape(config, local) -> None:
  """The preprocessing must produce config.image_size images (a size written into
  pp_train instead of '{size}' does not follow --config.image_size)."""
  shape = tuple(local["image"].shape[1:3])
  if shape != (config.image_size, config.image_size):
    raise errors.UserError(
        f"config.pp_train makes {shape[0]}x{shape[1]} images but config.image_size is "
        f"{config.image_size}; write the size as '{{size}}' in pp_train / pp_eval (e.g. "
        "inception_crop({size})) or make them agree.")


def check_finite(history, first_step: int, checkpointer) -> None:
  """Stops the run at the first step whose loss, gradients or new weights are NaN/Inf."""
  for i, h in enumerate(history):
    values = {k: h[k] for k in ("train/loss", "train/grad_norm", "train/param_norm")}
    if all(np.isfinite(v) for v in values.values()):
      continue
    checkpointer.wait()  # name only a committed checkpoint
    last = checkpointer.latest_step()
    where = (f"the last good checkpoint is step {last} in {checkpointer.directory}"
             if last is not None else "no checkpoint was saved before it")
    raise errors.DivergenceError(
        f"Training diverged at step {first_step + i} (loss {h['train/loss']}, gradient "
        f"norm {h['train/grad_norm']}, parameter norm {h['train/param_norm']}); {where}. "
        "Lower the learning rate or raise the warmup, then rerun on the same workdir to "
        "resume.")
