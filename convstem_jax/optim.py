"""How the model learns: learning-rate schedules, the optimizer, weight-decay masks, EMA
weights and the (label-smoothed) cross-entropy loss.

Everything returned here is jittable: schedules are pure `jnp` functions of the step,
the optimizer is an optax transformation, EMA and loss are array arithmetic.

Conventions (the trainer relies on them):
- A *trainer step* is one call of the optimizer's `update`, on `config.batch_size`
  examples. `steps_per_epoch` and `total_steps` are counted in trainer steps, and the
  schedule returned by `make_optimizer` is a function of the trainer step (for logging).
- Gradient accumulation (`config.grad_accum_steps`) happens inside the train step: the
  step's global batch is split into micro-batches whose gradients are averaged, so one
  step is still one update on `config.batch_size` examples and nothing here changes.
  The model is not always the same function, though: BatchNorm normalises each
  micro-batch with that micro-batch's statistics (see `train.make_train_step`).

Recipes (../shared/reference/papers.md): conv-stem paper / pycls (section 1): AdamW
(0.9, 0.999), lr 1e-3 per 2048 images, wd 0.24 on everything but biases and norm gains,
5 warmup epochs from 0.1 x lr, half-cosine to 0.005 x lr, lr set once per epoch
(`schedule.per_epoch=True`, `warmup_init=0.1`, `end_factor=0.005`). DeiT (section 4):
lr 5e-4 per 512, 5 warmup epochs from 1e-6, cosine to 1e-5, wd 0.05 without decay on
position embedding and class token (`wd_posemb=False`, `wd_cls=False`).
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import optax

from convstem_jax import config as config_lib
from convstem_jax import errors

OPTIMIZERS = ("adamw", "sgd", "lamb")
DECAYS = ("cosine", "linear", "constant")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _get(cfg, key: str, default):
  """cfg.get(key) with `default` also for an explicit None (ConfigDict placeholders)."""
  if cfg is None:
    return default
  value = cfg.get(key, default)
  return default if value is None else value


# --------------------------------------------------------------------------- schedules


def base_lr(config) -> float:
  """config.lr, scaled linearly by config.batch_size / config.lr_batch_base if set."""
  lr = float(config.lr)
  if lr < 0:
    raise errors.UserError(f"config.lr is {lr}; a learning rate must not be negative.")
  batch_base = config_lib.get(config, "lr_batch_base")
  if batch_base:
    lr = lr * int(config.batch_size) / float(batch_base)
  return lr


def make_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """The learning rate as a jittable function of the trainer step.

  Reads `config.lr`, `config.lr_batch_base` / `config.batch_size` (see `base_lr`) and
  `config.schedule.{warmup_steps, warmup_epochs, warmup_init, decay, end_factor, end_lr,
  per_epoch}` and `warmup_lr`. With lr the (scaled) base lr, init = warmup_lr if set
  (not None; an absolute lr, as timm's warmup_lr) else warmup_init * lr, floor = end_lr
  if set (not None) else end_factor * lr, W the warmup steps (warmup_steps, or
  warmup_epochs * steps_per_epoch; not both) and T = total_steps:

  per_epoch=False (lr changes every step):
    step < W:  init + (lr - init) * step / W                      (linear warmup)
    step >= W: f = min((step - W) / (T - W), 1)
               cosine:   floor + (lr - floor) * (1 + cos(pi f)) / 2
               linear:   lr + (floor - lr) * f
               constant: lr
    so step 0 -> init, step W -> lr, step T (and later) -> floor.

  per_epoch=True (pycls `get_epoch_lr`, the lr is set once at the start of each epoch):
    e = floor(step / steps_per_epoch), E = T / steps_per_epoch, We = W / steps_per_epoch
    decay over the whole run, warmup epochs included:
      cosine:   d(e) = floor + (lr - floor) * (1 + cos(pi min(e, E) / E)) / 2
      linear:   d(e) = lr + (floor - lr) * min(e / E, 1)
      constant: d(e) = lr
    warmup multiplies it: lr(e) = d(e) * (w + (1 - w) * e / We) for e < We, else d(e),
    with w = init / lr. Epoch 0 -> init; the last epoch E-1 stays slightly
    above the floor, as in pycls.
  """
  sched = config_lib.get(config, "schedule")
  lr = base_lr(config)
  warmup_steps = config_lib.duration(sched, "warmup", steps_per_epoch, "schedule")
  warmup_init = float(config_lib.get(sched, "warmup_init", "schedule."))
  decay = config_lib.get(sched, "decay", "schedule.")
  if decay not in DECAYS:
    raise errors.UserError(f"Unknown schedule.decay '{decay}'; valid: {', '.join(DECAYS)}.")
  end_lr = config_lib.get(sched, "end_lr", "schedule.")
  floor = (float(end_lr) if end_lr is not None
           else float(config_lib.get(sched, "end_factor", "schedule.")) * lr)
  per_epoch = bool(config_lib.get(sched, "per_epoch", "schedule."))
  if total_steps <= 0 or steps_per_epoch <= 0:
    raise errors.UserError(f"Need total_steps > 0 and steps_per_epoch > 0, got "
                           f"{total_steps} and {steps_per_epoch}.")
  warmup_lr = config_lib.get(sched, "warmup_lr", "schedule.")
  init = float(warmup_lr) if warmup_lr is not None else warmup_init * lr
  warmup_init = init / lr if lr else 0.0  # the per-epoch warmup is a factor of lr

  def decayed(frac):  # frac in [0, 1] over the decay phase
    if decay == "cosine":
      return floor + (lr - floor) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
    if decay == "linear":
      return lr + (floor - lr) * frac
    return jnp.full_like(frac, lr)

  if per_epoch:
    if warmup_steps > 0 and init == 0.0:
      logging.warning("schedule.per_epoch with warmup_init=0 (and no warmup_lr): the lr "
                      "is 0 for the whole first epoch, which trains nothing; pycls starts "
                      "at warmup_init=0.1.")
    total_epochs = total_steps / steps_per_epoch
    warmup_epochs = warmup_steps / steps_per_epoch

    def schedule(step):
      epoch = jnp.maximum(jnp.asarray(step, jnp.int32) // steps_per_epoch, 0)
      epoch = epoch.astype(jnp.float32)
      value = decayed(jnp.minimum(epoch / total_epochs, 1.0))
      if warmup_epochs > 0:
        factor = warmup_init + (1.0 - warmup_init) * epoch / warmup_epochs
        value = jnp.where(epoch < warmup_epochs, value * factor, value)
      return value
    return schedule

  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.maximum(jnp.asarray(step, jnp.float32), 0.0)
    value = decayed(jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0))
    if warmup_steps > 0:
      value = jnp.where(step < warmup_steps,
                        init + (lr - init) * step / warmup_steps, value)
    return value
  return schedule


# ------------------------------------------------------------------ weight-decay masks


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def decay_mask(params, config=None):
  """A pytree of bools like `params`: True where weight decay applies.

  No decay on biases and normalisation parameters: any leaf named `bias` or `scale`
  (LayerNorm, BatchNorm) and any leaf with fewer than 2 dims. Kernels and embeddings
  are decayed, except that `pos_embedding` follows `config.wd_posemb` and the class
  token `cls` follows `config.wd_cls` (defaults: the base config's, no decay): pycls
  decays both, DeiT / timm do not. Decided by the path's names, so it works for any flax model (and
  on `jax.eval_shape` outputs); a trailing `value` (boxed params) is skipped.
  """
  wd_posemb = bool(config_lib.get(config, "wd_posemb"))
  wd_cls = bool(config_lib.get(config, "wd_cls"))

  def decide(path, leaf) -> bool:
    names = [_key_name(p) for p in path]
    if len(names) > 1 and names[-1] == "value":
      names = names[:-1]
    name = names[-1] if names else ""
    if name == "pos_embedding":
      return wd_posemb
    if name == "cls":
      return wd_cls
    if name in ("bias", "scale") or len(getattr(leaf, "shape", ())) < 2:
      return False
    return True

  return jax.tree_util.tree_map_with_path(decide, params)


# -------------------------------------------------------------------------- optimizer


def make_optimizer(config, params, steps_per_epoch: int, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optax optimizer, lr schedule of the trainer step) for `config`.

  Reads `config.optimizer` ('adamw' default, 'sgd', 'lamb'), `config.optimizer_kw`
  (adamw / lamb: b1 0.9, b2 0.999, eps 1e-8 adamw / 1e-6 lamb; sgd: momentum 0.9,
  nesterov True), `config.weight_decay` (0.0), `config.grad_clip_norm` (0/None = off),
  `config.mu_dtype` (None: the params' dtype; e.g.
  'bfloat16' for Adam's first moment or SGD's momentum buffer), and the schedule fields
  of `make_schedule`; the decay mask comes from `decay_mask` (wd_posemb, wd_cls).

  Weight decay: AdamW and LAMB decouple it (AdamW as PyTorch / optax: p -= lr * (adam
  update + wd * p)). SGD follows torch.optim.SGD(weight_decay=wd), the pycls optimizer:
  wd * p is added to the (clipped) gradient before momentum, i.e. L2 regularisation.
  Gradient clipping acts on the raw gradients' global norm, before anything else.
  The mask is recomputed from the tree the optimizer is given (abstract or sharded
  trees work); `params` is only used to build it once here, so a bad tree fails early.
  """
  schedule = make_schedule(config, steps_per_epoch, total_steps)
  lr = schedule

  name = config_lib.get(config, "optimizer")
  kw = config_lib.get(config, "optimizer_kw")
  wd = float(config_lib.get(config, "weight_decay"))
  mu_dtype = config_lib.get(config, "mu_dtype")
  if mu_dtype is not None:
    if mu_dtype not in _DTYPES:
      raise errors.UserError(f"Unknown mu_dtype '{mu_dtype}'; valid: {', '.join(_DTYPES)}.")
    mu_dtype = _DTYPES[mu_dtype]
  mask = lambda p: decay_mask(p, config)
  mask(params)  # fail here, not inside the first jitted step

  if name == "adamw":
    tx = optax.adamw(lr, b1=float(_get(kw, "b1", 0.9)), b2=float(_get(kw, "b2", 0.999)),
                     eps=float(_get(kw, "eps", 1e-8)), mu_dtype=mu_dtype,
                     weight_decay=wd, mask=mask)
  elif name == "lamb":
    # optax.lamb's chain, with mu_dtype passed through to the Adam moments.
    tx = optax.chain(
        optax.scale_by_adam(b1=float(_get(kw, "b1", 0.9)), b2=float(_get(kw, "b2", 0.999)),
                            eps=float(_get(kw, "eps", 1e-6)), mu_dtype=mu_dtype),
        optax.add_decayed_weights(wd, mask),
        optax.scale_by_trust_ratio(),
        optax.scale_by_learning_rate(lr))
  elif name == "sgd":
    momentum = float(_get(kw, "momentum", 0.9))
    parts = [optax.add_decayed_weights(wd, mask)] if wd else []
    if momentum:
      parts.append(optax.trace(momentum, nesterov=bool(_get(kw, "nesterov", True)),
                               accumulator_dtype=mu_dtype))
    parts.append(optax.scale_by_learning_rate(lr))
    tx = optax.chain(*parts)
  else:
    raise errors.UserError(f"Unknown optimizer '{name}'; valid: {', '.join(OPTIMIZERS)}.")

  clip = config_lib.get(config, "grad_clip_norm")
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(float(clip)), tx)
  return tx, schedule


# -------------------------------------------------------------------------------- EMA


def ema_schedule(config, steps_per_epoch: int, total_steps: int):
  """decay(step) for the EMA weights (jittable; 0 copies the model), or None (no EMA).

  The per-step decay is `config.ema_decay`, or, with `config.ema_pycls_alpha` > 0,
  pycls's rate: every P = `ema_pycls_period` steps pycls mixes in alpha = min(1,
  ema_pycls_alpha * batch_size / epochs * P) of the model, i.e. decay (1 - alpha)^(1/P)
  per step, with epochs = total_steps / steps_per_epoch of this run (so the rate follows
  --config.batch_size and the duration). Setting both is a mistake. With
  `config.ema_warmup` the decay is min(decay, (1 + step) / (10 + step)), as TF's
  ExponentialMovingAverage with num_updates and timm's ModelEmaV2 warmup. Before
  `ema_copy_steps` / `ema_copy_epochs` the decay is 0: pycls copies the model into its
  EMA during the warmup epochs.
  """
  fixed = float(config_lib.get(config, "ema_decay"))
  alpha = float(config_lib.get(config, "ema_pycls_alpha"))
  if fixed and alpha:
    raise errors.UserError(f"config.ema_decay={fixed} and config.ema_pycls_alpha={alpha} "
                           "are both set; keep one and set the other to 0.")
  if not (0.0 <= fixed < 1.0) or alpha < 0:
    raise errors.UserError(f"config.ema_decay must be in [0, 1) (0 = off), got {fixed}.")
  if alpha:
    period = int(config_lib.get(config, "ema_pycls_period"))
    epochs = total_steps / steps_per_epoch
    mix = min(1.0, alpha * int(config.batch_size) / epochs * period)
    fixed = (1.0 - mix) ** (1.0 / period)
  if not fixed and not alpha:
    return None
  warmup = bool(config_lib.get(config, "ema_warmup"))
  copy_steps = config_lib.duration(config, "ema_copy", steps_per_epoch)

  def decay_at(step):
    decay = jnp.float32(fixed)
    step = jnp.asarray(step, jnp.float32)
    if warmup:
      decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    if copy_steps > 0:
      decay = jnp.where(step < copy_steps, 0.0, decay)
    return decay
  return decay_at


def ema_update(ema_params, params, decay):
  """decay * ema + (1 - decay) * params, leaf by leaf, computed in float32.

  Returns leaves in the EMA's dtype (keep the EMA in float32 even for bf16 params).
  Also usable for other float state (e.g. BatchNorm statistics).
  """
  decay = jnp.asarray(decay, jnp.float32)

  def mix(e, p):
    out = decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32)
    return out.astype(e.dtype)

  return jax.tree_util.tree_map(mix, ema_params, params)


# ------------------------------------------------------------------------------- loss


def smooth_labels(one_hot, smoothing: float):
  """Label smoothing as pycls / timm / DeiT: (1 - s) * y + s / num_classes.

  Linear in y, so it may be applied before or after mixup / CutMix on soft targets.
  """
  if not smoothing:
    return one_hot
  num_classes = one_hot.shape[-1]
  return one_hot * (1.0 - smoothing) + smoothing / num_classes


def softmax_cross_entropy(logits, targets):
  """Per-example -sum(targets * log_softmax(logits)) in float32; shape logits.shape[:-1].

  `targets` are probabilities (one-hot, smoothed or mixed); average over the batch in
  the trainer.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(targets.astype(jnp.float32) * logp, axis=-1)
