"""The training loop, top to bottom.

    setup -> mesh -> data -> model and optimizer (born sharded) -> update step
          -> restore (workdir, else config.init_from, else fresh) -> loop
             (log, eval, checkpoint, NaN guard)

Every array in the state is a global `jax.Array` sharded over the mesh, so the same code
runs on one CPU, a GPU node and a TPU pod slice, and orbax can save it from every host.
The step is compiled once; the host waits for the device only at log steps.
`plan_state`, `make_init_state`, `make_train_step` and `jit_train_step` build the state
and the step; `tools/benchmark.py` uses them too, so it times the very step trained here.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from convstem_jax import checkpoint as ckpt_lib
from convstem_jax import data as data_lib
from convstem_jax import evaluate as eval_lib
from convstem_jax import metrics as metrics_lib
from convstem_jax import optim
from convstem_jax import sharding as shd
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


def steps_for(config, steps_per_epoch: int) -> int:
  """config.total_steps wins when set (> 0); else total_epochs x steps per epoch."""
  if config.get("total_steps", 0):
    return int(config.total_steps)
  if config.get("total_epochs", 0):
    return max(1, int(round(config.total_epochs * steps_per_epoch)))
  raise ValueError("Set config.total_steps or config.total_epochs to a positive value.")


def every(config, name: str, steps_per_epoch: int) -> int:
  """A cadence given as `<name>_steps` or `<name>_epochs` (0 = never) -> steps."""
  if config.get(f"{name}_steps", 0):
    return int(config.get(f"{name}_steps"))
  if config.get(f"{name}_epochs", 0):
    return max(1, int(round(config.get(f"{name}_epochs") * steps_per_epoch)))
  return 0


def write_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))


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


def plan_state(config, model, mesh, steps_per_epoch: int, total_steps: int):
  """Everything about the train state before any array exists: (tx, schedule,
  init_state, abstract_state, state_sharding). jit `init_state` with
  `out_shardings=state_sharding` for a fresh state, or restore onto the shardings."""
  init_images = jnp.zeros((1, model.img_size, model.img_size, 3), jnp.float32)
  rng = jax.random.PRNGKey(0)  # shapes only
  abstract_vars = jax.eval_shape(lambda: model.init(rng, init_images))
  tx, schedule = optim.make_optimizer(config, abstract_vars["params"], steps_per_epoch,
                                      total_steps)
  init_state = make_init_state(model, tx, config.get("ema_decay", 0.0) > 0)
  abstract_state = jax.eval_shape(init_state, rng)
  state_sharding = shd.state_shardings(abstract_state, mesh, config.get("fsdp", False))
  return tx, schedule, init_state, abstract_state, state_sharding


def make_train_step(config, model, tx: optax.GradientTransformation,
                    schedule: optax.Schedule):
  """The update step, not yet jitted: train_step(state, batch) -> (state, metrics).

  Mixup / CutMix (on the global batch), gradient accumulation over micro-batches, the
  optax update, EMA and the step's metrics, all from `config`.
  """
  use_ema = config.get("ema_decay", 0.0) > 0
  accum = max(1, config.get("grad_accum_steps", 1))
  if config.batch_size % (accum * jax.device_count()):
    raise ValueError(f"grad_accum_steps={accum} micro-batches of a global batch of "
                     f"{config.batch_size} do not split evenly over {jax.device_count()} "
                     "devices; make batch_size a multiple of grad_accum_steps x devices.")
  smoothing = config.get("label_smoothing", 0.0)
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
      # devices; BatchNorm statistics thread through them in order.
      micro = jax.tree.map(
          lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1),
          batch)

      def body(carry, mb_and_i):
        grads, batch_stats, loss, acc = carry
        mb, i = mb_and_i
        (l, (batch_stats, a)), g = grad_fn(state.params, batch_stats, mb,
                                           jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, grads, g), batch_stats, loss + l, acc + a), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, batch_stats, loss, acc), _ = jax.lax.scan(
          body, (zeros, state.batch_stats, 0.0, 0.0), (micro, jnp.arange(accum)))
      grads, loss, acc = jax.tree.map(lambda g: g / accum, grads), loss / accum, acc / accum

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if use_ema:
      decay = optim.ema_decay(config, state.step)
      ema = optim.ema_update(ema, {"params": params, "batch_stats": batch_stats}, decay)
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
  """Trains (resuming from the workdir's latest checkpoint) and returns the final evals."""
  # ---------------------------------------------------------------- setup
  model = model_from_config(config)  # a bad model name fails before anything is written
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  write_config(config, workdir)
  logging.info("Process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)

  # ---------------------------------------------------------------- mesh
  mesh = shd.make_mesh(config.get("mesh", ((shd.DATA, -1),)))
  local_bs = shd.local_batch_size(config.batch_size)

  # ---------------------------------------------------------------- data
  train_source = data_lib.get_source(config, config.get("train_split", "train"))
  steps_per_epoch = max(1, train_source.num_examples // config.batch_size)
  total_steps = steps_for(config, steps_per_epoch)
  log_every = max(1, config.get("log_every_steps", 50))
  eval_every = every(config, "eval_every", steps_per_epoch)
  ckpt_every = every(config, "checkpoint_every", steps_per_epoch)
  logging.info("%s: %d train examples, %d steps/epoch, %d steps of global batch %d",
               config.dataset, train_source.num_examples, steps_per_epoch, total_steps,
               config.batch_size)
  if config.dataset == "synthetic":
    logging.warning("Training on synthetic data (class-coloured noise): this checks the "
                    "machinery, not a recipe.")

  # ------------------------------------------------- model and optimizer, born sharded
  root_rng = jax.random.PRNGKey(config.seed)
  tx, schedule, init_state, abstract_state, state_sharding = plan_state(
      config, model, mesh, steps_per_epoch, total_steps)

  # ---------------------------------------------------------------- update step
  train_step = jit_train_step(make_train_step(config, model, tx, schedule),
                              state_sharding, mesh)

  # ------------------------------------- restore: workdir, else init_from, else fresh
  checkpointer = ckpt_lib.Checkpointer(workdir, config.get("max_to_keep", 3))
  abstract_sharded = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, state_sharding)
  start = checkpointer.latest_step()
  if start is not None:
    t0 = time.perf_counter()
    state = TrainState(**checkpointer.restore(start, abstract_sharded.as_dict()))
    logging.info("Resumed from checkpoint %s/%d (%.1fs) on %d devices.",
                 checkpointer.directory, start, time.perf_counter() - t0,
                 jax.device_count())
  else:
    start = 0
    state = jax.jit(init_state, out_shardings=state_sharding)(root_rng)
    if config.get("init_from"):
      state = eval_lib.load_init_from(config.init_from, state, state_sharding)
  metrics_lib.log_parameter_overview(state.params)
  if start >= total_steps:
    logging.info("Checkpoint step %d already reaches total_steps %d.", start, total_steps)

  # ---------------------------------------------------------------- evaluators
  evaluator = eval_lib.Evaluator(config, model, mesh, train_source=train_source)

  # ---------------------------------------------------------------- loop
  writer = metrics_lib.MetricsWriter(workdir)
  if start == 0:
    writer.write_hparams(dict(config.to_dict()))
  progress = metrics_lib.Progress(total_steps, config.batch_size, start)
  batches = train_source.train_batches(local_bs, start_step=start)
  profile = config.get("profile_steps", ())  # (first step, number of steps)
  pending: list[dict[str, jax.Array]] = []
  last_saved = start if start else None
  results: dict[str, float] = {}

  for step in range(start + 1, total_steps + 1):
    if profile and step == profile[0] and jax.process_index() == 0:
      jax.profiler.start_trace(str(epath.Path(workdir) / "profile"))
    batch = shd.global_batch(next(batches), mesh)
    state, step_metrics = train_step(state, batch)
    pending.append(step_metrics)
    if step == start + 1:  # one wait, so compile time stays out of the throughput
      jax.block_until_ready(step_metrics)
      logging.info("First step (compilation included) done in %.1fs.",
                   time.perf_counter() - progress.t0)
      progress = metrics_lib.Progress(total_steps, config.batch_size, step)
    if profile and step == profile[0] + profile[1] - 1 and jax.process_index() == 0:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()

    is_last = step == total_steps
    is_eval = is_last or (eval_every and step % eval_every == 0)
    is_ckpt = is_last or (ckpt_every and step % ckpt_every == 0)
    if not (is_last or is_eval or is_ckpt or step % log_every == 0):
      continue

    # Log step: the only place the host waits for the device. Checkpoint and eval steps
    # are log steps too, so a NaN is caught before it is saved.
    history = jax.device_get(pending)
    pending = []
    check_finite(history, step - len(history) + 1, last_saved, checkpointer)
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
    if is_ckpt:
      t_save = time.perf_counter()
      checkpointer.save(step, state.as_dict())
      last_saved = step
      logging.info("Checkpoint %d started in %.2fs (written in the background).", step,
                   time.perf_counter() - t_save)
    progress.pause(time.perf_counter() - t0)
    writer.write(step, scalars)

  checkpointer.close()
  writer.close()
  return results


def check_finite(history, first_step: int, last_saved: int | None, checkpointer) -> None:
  """Stops the run at the first step whose loss, gradients or new weights are NaN/Inf."""
  for i, h in enumerate(history):
    if not all(np.isfinite(h[k]) for k in ("train/loss", "train/grad_norm",
                                           "train/param_norm")):
      where = (f"the last good checkpoint is step {last_saved} in {checkpointer.directory}"
               if last_saved else "no checkpoint was saved before it")
      raise FloatingPointError(
          f"Training diverged: loss {h['train/loss']} / gradient norm "
          f"{h['train/grad_norm']} at step {first_step + i}; {where}. Lower the learning "
          "rate or raise the warmup, then rerun on the same workdir to resume.")
