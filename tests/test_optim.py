"""Schedules, decay masks, optimizers, EMA and loss of convstem_jax.optim."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from convstem_jax import errors
from convstem_jax import config as config_lib
from convstem_jax import optim
from convstem_jax.models import variants


def make_config(**kw):
  """The base config (its defaults for every field not given), lr not batch-scaled and
  no warmup unless the test sets one."""
  schedule = {"warmup_steps": 0, "warmup_epochs": 0.0, **kw.pop("schedule", {})}
  cfg = config_lib.base_config()
  cfg.update(dict(lr=1e-3, batch_size=2048, optimizer="adamw", weight_decay=0.0,
                  lr_batch_base=0), **kw)
  cfg.schedule.update(schedule)
  return cfg


def lrs(schedule, steps):
  return np.array([float(schedule(s)) for s in steps])


# ----------------------------------------------------------------------- schedules


def test_per_step_warmup_cosine_values():
  cfg = make_config(schedule=dict(warmup_steps=10, warmup_init=0.1, end_factor=0.005))
  sched = optim.make_schedule(cfg, steps_per_epoch=10, total_steps=110)
  got = lrs(sched, [0, 5, 10, 35, 60, 110, 500])
  quarter = 5e-6 + 995e-6 * 0.5 * (1 + math.cos(math.pi / 4))
  want = [1e-4, 5.5e-4, 1e-3, quarter, 5.025e-4, 5e-6, 5e-6]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # jittable, and monotone after the warmup
  jitted = jax.jit(sched)(jnp.arange(10, 111))
  assert np.all(np.diff(np.asarray(jitted)) <= 0)
  np.testing.assert_allclose(float(jax.jit(sched)(60)), 5.025e-4, rtol=1e-5)


def test_per_step_end_lr_and_other_decays():
  cfg = make_config(schedule=dict(warmup_steps=0, end_lr=1e-5, end_factor=0.5))
  sched = optim.make_schedule(cfg, 10, 100)
  np.testing.assert_allclose(lrs(sched, [0, 50, 100]), [1e-3, (1e-3 + 1e-5) / 2, 1e-5],
                             rtol=1e-5)  # end_lr wins over end_factor
  cfg.schedule.decay = "linear"
  sched = optim.make_schedule(cfg, 10, 100)
  np.testing.assert_allclose(lrs(sched, [0, 25, 100]),
                             [1e-3, 1e-3 - 0.25 * (1e-3 - 1e-5), 1e-5], rtol=1e-5)
  cfg.schedule.decay = "constant"
  cfg.schedule.warmup_steps = 4
  sched = optim.make_schedule(cfg, 10, 100)
  np.testing.assert_allclose(lrs(sched, [0, 2, 4, 99]), [0, 5e-4, 1e-3, 1e-3], rtol=1e-6)
  cfg.schedule.decay = "step"
  with pytest.raises(ValueError, match="decay"):
    optim.make_schedule(cfg, 10, 100)


def pycls_epoch_lr(epoch, base, max_epoch, warmup_epochs, warmup_factor, min_lr):
  """pycls/core/optimizer.py get_epoch_lr with lr_fun_cos (MIN_LR relative)."""
  lr = ((1.0 - min_lr) * 0.5 * (1.0 + np.cos(np.pi * epoch / max_epoch)) + min_lr) * base
  if epoch < warmup_epochs:
    alpha = epoch / warmup_epochs
    lr *= warmup_factor * (1.0 - alpha) + alpha
  return lr


def test_per_epoch_matches_pycls():
  cfg = make_config(schedule=dict(warmup_epochs=2, warmup_init=0.1, end_factor=0.005,
                                  per_epoch=True))
  sched = optim.make_schedule(cfg, steps_per_epoch=10, total_steps=100)  # 10 epochs
  by_step = lrs(sched, range(100)).reshape(10, 10)
  # constant within an epoch
  np.testing.assert_array_equal(by_step, by_step[:, :1].repeat(10, axis=1))
  epoch_lr = by_step[:, 0]
  # hand-computed epoch boundaries
  np.testing.assert_allclose(epoch_lr[0], 1e-4, rtol=1e-6)
  np.testing.assert_allclose(epoch_lr[1], (5e-6 + 995e-6 * 0.97552825815) * 0.55, rtol=1e-6)
  np.testing.assert_allclose(epoch_lr[2], 5e-6 + 995e-6 * 0.904508497187, rtol=1e-6)
  np.testing.assert_allclose(epoch_lr[5], 5.025e-4, rtol=1e-6)
  np.testing.assert_allclose(epoch_lr[9], 5e-6 + 995e-6 * 0.0244717418524, rtol=1e-5)
  want = [pycls_epoch_lr(e, 1e-3, 10, 2, 0.1, 0.005) for e in range(10)]
  np.testing.assert_allclose(epoch_lr, want, rtol=1e-5)
  np.testing.assert_allclose(float(sched(10_000)), 5e-6, rtol=1e-5)  # past the end
  np.testing.assert_allclose(float(jax.jit(sched)(jnp.int32(57))), want[5], rtol=1e-5)


def test_lr_batch_scaling():
  cfg = make_config(lr=5e-4, lr_batch_base=512, batch_size=1024)
  np.testing.assert_allclose(float(optim.make_schedule(cfg, 10, 100)(0)), 1e-3, rtol=1e-6)
  cfg.batch_size = 256
  np.testing.assert_allclose(float(optim.make_schedule(cfg, 10, 100)(0)), 2.5e-4, rtol=1e-6)
  cfg.grad_accum_steps = 4  # micro-batches of the same global batch: no change
  np.testing.assert_allclose(optim.base_lr(cfg), 2.5e-4, rtol=1e-6)
  cfg.lr_batch_base = 0  # 0: no scaling
  assert optim.base_lr(cfg) == 5e-4


def test_warmup_in_steps_or_epochs_never_both():
  cfg = make_config(schedule=dict(warmup_steps=7, warmup_epochs=0, decay="constant"))
  sched = optim.make_schedule(cfg, steps_per_epoch=10, total_steps=100)
  assert float(sched(6)) < 1e-3 and float(sched(7)) == pytest.approx(1e-3)
  cfg.schedule.update(warmup_steps=0, warmup_epochs=2)
  sched = optim.make_schedule(cfg, steps_per_epoch=10, total_steps=100)
  assert float(sched(19)) == pytest.approx(1e-3 * 19 / 20)
  assert float(sched(20)) == pytest.approx(1e-3)
  cfg.schedule.warmup_steps = 7  # both: a mistake, not a silent precedence
  with pytest.raises(errors.UserError, match=r"warmup_steps=7 and config.schedule."
                                             r"warmup_epochs=2.0 are both set"):
    optim.make_schedule(cfg, steps_per_epoch=10, total_steps=100)


def test_negative_learning_rate_is_refused():
  with pytest.raises(errors.UserError, match="must not be negative"):
    optim.make_schedule(make_config(lr=-1e-3), 10, 100)


# ----------------------------------------------------------------------- decay masks


def toy_params():
  f = lambda *s: jnp.full(s, 2.0, jnp.float32)
  return {
      "stem": {"conv_0": {"kernel": f(3, 3, 3, 4)}, "norm_0": {"scale": f(4), "bias": f(4)},
               "embedding": {"kernel": f(1, 1, 4, 3), "bias": f(3)}},
      "cls": f(1, 1, 3), "pos_embedding": f(1, 5, 3),
      "block_0": {"norm1": {"scale": f(3), "bias": f(3)},
                  "attn": {"qkv": {"kernel": f(3, 9), "bias": f(9)}}},
      "head": {"kernel": f(3, 2), "bias": f(2)},
  }


def test_decay_mask_names():
  mask = optim.decay_mask(toy_params(), make_config())
  assert mask["stem"]["conv_0"]["kernel"] and mask["stem"]["embedding"]["kernel"]
  assert mask["block_0"]["attn"]["qkv"]["kernel"] and mask["head"]["kernel"]
  assert not any([mask["stem"]["norm_0"]["scale"], mask["stem"]["norm_0"]["bias"],
                  mask["stem"]["embedding"]["bias"], mask["block_0"]["norm1"]["scale"],
                  mask["block_0"]["norm1"]["bias"], mask["block_0"]["attn"]["qkv"]["bias"],
                  mask["head"]["bias"]])
  assert not mask["cls"] and not mask["pos_embedding"]  # the base config's default (DeiT)
  mask = optim.decay_mask(toy_params(), make_config(wd_posemb=True, wd_cls=True))  # pycls
  assert mask["cls"] and mask["pos_embedding"] and mask["head"]["kernel"]
  mask = optim.decay_mask(toy_params(), make_config(wd_cls=True))
  assert mask["cls"] and not mask["pos_embedding"]


def test_decay_mask_on_real_model():
  model = variants.create_model("vitc_1gf", depth=2, num_classes=10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 224, 224, 3))))["params"]
  flat = {"/".join(str(k.key) for k in path): m for path, m in
          jax.tree_util.tree_leaves_with_path(optim.decay_mask(shapes, None))}
  decayed = {k for k, m in flat.items() if m}
  assert decayed == {k for k in flat if k.endswith("kernel")}  # default: not cls / pos-emb
  assert "stem/norm_0/scale" in flat and "encoder_norm/bias" in flat
  assert "block_1/attn/qkv/kernel" in decayed and "block_1/mlp/fc2/kernel" in decayed


# ------------------------------------------------------------------------ optimizers


def constant_lr(lr, **kw):
  return make_config(lr=lr, schedule=dict(decay="constant"), **kw)


def test_adamw_decays_masked_params_only():
  params = toy_params()
  cfg = constant_lr(0.1, weight_decay=0.5, wd_cls=False, wd_posemb=True)
  tx, sched = optim.make_optimizer(cfg, params, 10, 100)
  state = tx.init(params)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, state, params)
  # zero grads: Adam's part is 0, decoupled decay gives -lr * wd * p = -0.1
  np.testing.assert_allclose(updates["head"]["kernel"], -0.1, rtol=1e-6)
  np.testing.assert_allclose(updates["stem"]["conv_0"]["kernel"], -0.1, rtol=1e-6)
  np.testing.assert_allclose(updates["pos_embedding"], -0.1, rtol=1e-6)
  for leaf in (updates["head"]["bias"], updates["stem"]["norm_0"]["scale"],
               updates["block_0"]["attn"]["qkv"]["bias"], updates["cls"]):
    np.testing.assert_array_equal(leaf, 0.0)
  assert float(sched(0)) == pytest.approx(0.1)


def test_adamw_mu_dtype():
  params = toy_params()
  cfg = constant_lr(0.1, mu_dtype="bfloat16", optimizer_kw=dict(b1=0.8, eps=1e-6))
  tx, _ = optim.make_optimizer(cfg, params, 10, 100)
  state = tx.init(params)
  mu_dtypes = {x.dtype for x in jax.tree_util.tree_leaves(state[0].mu)}
  nu_dtypes = {x.dtype for x in jax.tree_util.tree_leaves(state[0].nu)}
  assert mu_dtypes == {jnp.dtype(jnp.bfloat16)} and nu_dtypes == {jnp.dtype(jnp.float32)}


def torch_sgd(p, g, mask, lr, momentum, wd, nesterov, steps):
  """torch.optim.SGD (dampening 0) with the same gradient at every step."""
  buf = None
  for _ in range(steps):
    d = g + wd * p * mask
    buf = d if buf is None else momentum * buf + d
    p = p - lr * (d + momentum * buf if nesterov else buf)
  return p


@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_matches_torch_semantics(nesterov):
  params = {"w": {"kernel": jnp.array([[1.0, -2.0], [3.0, 0.5]]), "bias": jnp.array([1.0, 2.0])}}
  grads = {"w": {"kernel": jnp.array([[0.5, 0.1], [-0.3, 0.2]]), "bias": jnp.array([0.4, -1.0])}}
  cfg = constant_lr(0.1, optimizer="sgd", weight_decay=0.01,
                    optimizer_kw=dict(momentum=0.9, nesterov=nesterov))
  tx, _ = optim.make_optimizer(cfg, params, 10, 100)
  state, p = tx.init(params), params
  step = jax.jit(tx.update)
  for _ in range(3):
    updates, state = step(grads, state, p)
    p = optax.apply_updates(p, updates)
  for name, m in (("kernel", 1.0), ("bias", 0.0)):
    want = torch_sgd(np.asarray(params["w"][name]), np.asarray(grads["w"][name]), m, 0.1,
                     0.9, 0.01, nesterov, 3)
    np.testing.assert_allclose(p["w"][name], want, rtol=1e-6)


def test_lamb_builds_and_matches_optax():
  params = {"head": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.ones(2)}}
  grads = jax.tree_util.tree_map(lambda x: jnp.linspace(-1, 1, x.size).reshape(x.shape),
                                 params)
  cfg = constant_lr(0.01, optimizer="lamb", weight_decay=0.1)
  tx, _ = optim.make_optimizer(cfg, params, 10, 100)
  ref = optax.lamb(0.01, eps=cfg.optimizer_kw.eps, weight_decay=0.1,
                   mask=optim.decay_mask(params, cfg))
  ours, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  theirs, _ = jax.jit(ref.update)(grads, ref.init(params), params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours,
                         theirs)
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(ours))
  assert float(jnp.abs(ours["head"]["kernel"]).max()) > 0


def test_unknown_optimizer():
  with pytest.raises(ValueError, match="optimizer"):
    optim.make_optimizer(constant_lr(0.1, optimizer="adam"), toy_params(), 10, 100)


def test_grad_clipping_bounds_update():
  params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  big = {"a": jnp.array([3.0, 4.0, 0.0]), "b": jnp.full((2, 2), 10.0)}  # norm sqrt(425)
  small = jax.tree_util.tree_map(lambda x: x / 100, big)
  cfg = constant_lr(1.0, optimizer="sgd", grad_clip_norm=2.0, optimizer_kw=dict(momentum=0))
  tx, _ = optim.make_optimizer(cfg, params, 10, 100)
  updates, _ = tx.update(big, tx.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(updates), 2.0, rtol=1e-6)
  np.testing.assert_allclose(updates["a"], -2.0 * big["a"] / math.sqrt(425), rtol=1e-6)
  updates, _ = tx.update(small, tx.init(params), params)  # under the bound: untouched
  np.testing.assert_allclose(updates["b"], -small["b"], rtol=1e-6)
  cfg.grad_clip_norm = None
  tx, _ = optim.make_optimizer(cfg, params, 10, 100)
  updates, _ = tx.update(big, tx.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(updates), math.sqrt(425), rtol=1e-6)


# ------------------------------------------------------------------------ EMA, loss


def test_ema_update_exact():
  ema = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([[4.0]])}
  params = {"a": jnp.array([3.0, 6.0]), "b": jnp.array([[0.0]], jnp.bfloat16)}
  new = jax.jit(optim.ema_update)(ema, params, 0.75)
  np.testing.assert_array_equal(new["a"], [1.5, 3.0])
  np.testing.assert_array_equal(new["b"], [[3.0]])
  assert new["b"].dtype == jnp.float32
  np.testing.assert_array_equal(optim.ema_update(ema, params, 0.0)["a"], [3.0, 6.0])


def test_ema_schedule():
  ema = lambda cfg: optim.ema_schedule(cfg, steps_per_epoch=10, total_steps=1000)
  cfg = make_config(ema_decay=0.9999)
  assert float(ema(cfg)(5)) == pytest.approx(0.9999)
  cfg.ema_warmup = True
  assert float(ema(cfg)(0)) == pytest.approx(0.1)
  assert float(jax.jit(ema(cfg))(90)) == pytest.approx(0.91)
  assert float(ema(cfg)(10**8)) == pytest.approx(0.9999)
  cfg.ema_warmup, cfg.ema_copy_steps = False, 50
  assert float(ema(cfg)(49)) == 0.0
  assert float(ema(cfg)(50)) == pytest.approx(0.9999)
  cfg.ema_copy_steps, cfg.ema_copy_epochs = 0, 2.0  # 2 epochs of 10 steps
  assert float(ema(cfg)(19)) == 0.0 and float(ema(cfg)(20)) == pytest.approx(0.9999)
  assert ema(make_config()) is None  # no EMA


def test_ema_pycls_rate_follows_batch_size_and_duration():
  # pycls: every 32 steps mix in alpha = 1e-5 * batch / epochs * 32 -> per-step decay.
  cfg = make_config(ema_pycls_alpha=1e-5, ema_pycls_period=32, batch_size=2048)
  decay = float(optim.ema_schedule(cfg, steps_per_epoch=625, total_steps=625 * 400)(10))
  assert decay ** 32 == pytest.approx(1 - 1e-5 * 2048 / 400 * 32, rel=1e-6)
  cfg.batch_size = 1024  # half the batch, same 400 epochs: half the rate per step
  decay = float(optim.ema_schedule(cfg, steps_per_epoch=1250, total_steps=1250 * 400)(10))
  assert decay ** 32 == pytest.approx(1 - 1e-5 * 1024 / 400 * 32, rel=1e-6)
  cfg.ema_decay = 0.99
  with pytest.raises(errors.UserError, match="both set"):
    optim.ema_schedule(cfg, 10, 100)


def test_label_smoothing_and_cross_entropy():
  one_hot = jnp.array([[0.0, 1.0, 0.0, 0.0]])
  smoothed = optim.smooth_labels(one_hot, 0.1)
  np.testing.assert_allclose(smoothed, [[0.025, 0.925, 0.025, 0.025]], rtol=1e-6)
  assert optim.smooth_labels(one_hot, 0.0) is one_hot
  probs = np.array([0.1, 0.2, 0.3, 0.4])
  logits = jnp.asarray(np.log(probs) + 7.0, jnp.float32)[None]  # shift-invariant
  np.testing.assert_allclose(optim.softmax_cross_entropy(logits, one_hot), [-math.log(0.2)],
                             rtol=1e-6)
  want = -(0.025 * math.log(0.1) + 0.925 * math.log(0.2) + 0.025 * math.log(0.3)
           + 0.025 * math.log(0.4))
  np.testing.assert_allclose(optim.softmax_cross_entropy(logits, smoothed), [want], rtol=1e-6)
  loss = optim.softmax_cross_entropy(logits.astype(jnp.bfloat16), smoothed)
  assert loss.dtype == jnp.float32 and loss.shape == (1,)
