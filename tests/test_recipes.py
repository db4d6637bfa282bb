"""Every shipped config's recipe as the trainer really runs it.

Each config is loaded the way `main` loads it (absl flags, `--config.X=` overrides, one
unit of a steps/epochs pair clearing the other), and the learning rate, warmup, floor and
EMA decay are read from the functions the train step calls (`train.durations`,
`train.plan_state`), at chosen steps, against the numbers in
`../shared/reference/papers.md`. The expected values are computed here from the papers'
formulas, not from the configs' fields.
"""

import math

import jax
import numpy as np
import pytest

from cli_util import REPO
from convstem_jax import errors
from convstem_jax import main as main_lib
from convstem_jax import optim
from convstem_jax import sharding as shd
from convstem_jax import train
from convstem_jax.data import files
from convstem_jax.models import model_from_config

IMAGENET_TRAIN = 1_281_167
CIFAR10_TRAIN = 50_000


def load(config_arg: str, *overrides: str):
  """The config `python -m convstem_jax.main --config=configs/<config_arg> <overrides>`
  trains with."""
  return main_lib.config_from_args(f"{REPO}/configs/{config_arg}", overrides)


def run_plan(config, num_train: int):
  """(durations, lr(step), ema_decay(step) or None) of the trainer for this config."""
  run = train.durations(config, num_train)
  model = model_from_config(config)
  mesh = shd.make_mesh(config.mesh)
  plan = train.plan_state(config, model, mesh, run.steps_per_epoch, run.total_steps)
  lr = lambda step: float(jax.jit(plan.schedule)(step))
  ema = (lambda step: float(plan.ema_decay(step))) if plan.ema_decay else None
  return run, lr, ema


def close(a, b, peak):
  """float32 schedules: a few float32 roundings of the values and of the peak lr (the
  cosine's 1 + cos(x) near x = pi cancels)."""
  return a == pytest.approx(b, rel=2e-6, abs=2e-6 * peak)


# ---- Xiao et al.: pycls's per-epoch lr, 5 warmup epochs from 0.1 x lr, cosine to
# 0.005 x lr, lr scaled per 2048 images; EMA alpha 1e-5 every 32 steps, copied in warmup.


def pycls_lr(epoch, base, epochs, warmup_epochs=5, warmup_factor=0.1, min_factor=0.005):
  """pycls `get_epoch_lr` (optimizer.py: lr_fun_cos + the warmup factor)."""
  lr = base * (min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * epoch / epochs)))
  if epoch < warmup_epochs:
    alpha = epoch / warmup_epochs
    lr *= warmup_factor * (1 - alpha) + alpha
  return lr


@pytest.mark.parametrize("batch", [2048, 1024])
def test_early_conv_lr_warmup_floor_and_ema(batch):
  overrides = [] if batch == 2048 else [f"--config.batch_size={batch}"]
  config = load("early_conv.py:model=vitc_4gf,epochs=100", *overrides)
  run, lr, ema = run_plan(config, IMAGENET_TRAIN)
  spe = IMAGENET_TRAIN // batch
  assert run.steps_per_epoch == spe and run.total_steps == 100 * spe
  base = 1e-3 * batch / 2048  # Table 4 C-4GF AdamW lr at 2048, scaled linearly
  for epoch in (0, 1, 4, 5, 6, 50, 99):
    for step in (epoch * spe, (epoch + 1) * spe - 1):  # set once per epoch
      assert close(lr(step), pycls_lr(epoch, base, 100), base), (epoch, step)
  assert close(lr(0), 0.1 * base, base)
  assert close(lr(run.total_steps), 0.005 * base, base)  # the floor: end_factor applies
  # EMA: pycls mixes alpha = 1e-5 * batch / epochs * 32 every 32 steps, and copies the
  # model during the 5 warmup epochs; the per-step decay follows the batch override.
  alpha = 1e-5 * batch / 100 * 32
  assert ema(5 * spe - 1) == 0.0
  assert ema(5 * spe) ** 32 == pytest.approx(1 - alpha, rel=1e-6)


def test_early_conv_sgd_and_400_epochs():
  config = load("early_conv.py:model=vitc_18gf,opt=sgd,epochs=400")
  run, lr, _ = run_plan(config, IMAGENET_TRAIN)
  assert run.total_steps == 400 * 625
  for epoch in (0, 3, 5, 200, 399):
    assert close(lr(epoch * 625 + 17), pycls_lr(epoch, 1.1, 400), 1.1), epoch  # Table 4 SGD


def test_early_conv_runs_as_long_as_given_in_steps():
  config = load("early_conv.py", "--config.total_steps=31250")
  run, lr, _ = run_plan(config, IMAGENET_TRAIN)
  assert run.total_steps == 31250  # total_epochs of the file is cleared: 50 epochs
  assert close(lr(3124), pycls_lr(4, 1e-3, 50), 1e-3)
  assert close(lr(31250), 0.005e-3, 1e-3)


# ---- Wang et al. (DeiT recipe): lr 5e-4 x batch / 512, 5 warmup epochs from 1e-6,
# cosine to 1e-5 over 300 epochs, EMA 0.99996.


def deit_lr(step, base, spe, epochs=300, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5):
  w, t = warmup_epochs * spe, epochs * spe
  if step < w:
    return warmup_lr + (base - warmup_lr) * step / w
  return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - w) / (t - w)))


@pytest.mark.parametrize("batch", [1024, 512])
def test_vit_b_srelu_deit_schedule(batch):
  overrides = [] if batch == 1024 else [f"--config.batch_size={batch}"]
  config = load("vit_b_srelu.py", *overrides)
  run, lr, ema = run_plan(config, IMAGENET_TRAIN)
  spe = IMAGENET_TRAIN // batch
  assert run.total_steps == 300 * spe
  base = 5e-4 * batch / 512
  assert close(lr(0), 1e-6, base)  # warmup_lr is absolute, not scaled with the batch
  assert close(lr(5 * spe), base, base)
  assert close(lr(run.total_steps), 1e-5, base)
  for step in (1, 2 * spe + 3, 5 * spe + 1, 150 * spe, 300 * spe - 1):
    assert close(lr(step), deit_lr(step, base, spe), base), step
  assert ema(0) == ema(10**6) == pytest.approx(0.99996, rel=1e-7)


# ---- Zheng et al. small-data recipe: batch 512, lr 1e-3 after 10 warmup epochs (from
# timm's 1e-6), cosine to 1e-6 over 200 epochs, no EMA.


def test_finetune_is_deits_fine_tuning_at_any_batch():
  # DeiT's README: --lr 5e-6 --weight-decay 1e-8 --epochs 30 --min-lr 5e-6 at batch 512
  # (32 x 16 GPUs), 5 warmup epochs from 1e-6 (its defaults); lr scales per 512.
  for batch in (512, 1024):
    config = load("finetune.py:init=/weights.npz,model=vit_b16,size=384",
                  f"--config.batch_size={batch}")
    run, lr, ema = run_plan(config, IMAGENET_TRAIN)
    spe = IMAGENET_TRAIN // batch
    peak = 5e-6 * batch / 512
    assert run.total_steps == 30 * spe and ema is None
    assert config.weight_decay == 1e-8 and model_from_config(config).img_size == 384
    assert close(lr(0), 1e-6, peak)
    assert close(lr(5 * spe), peak, peak)
    expected = deit_lr(20 * spe, peak, spe, epochs=30, warmup_epochs=5, min_lr=5e-6)
    assert close(lr(20 * spe), expected, peak)
    assert close(lr(run.total_steps), 5e-6, peak)


def test_structured_init_cifar_schedule():
  config = load("structured_init.py:dataset=cifar10")
  run, lr, ema = run_plan(config, CIFAR10_TRAIN)
  spe = CIFAR10_TRAIN // 512
  assert run.steps_per_epoch == spe and run.total_steps == 200 * spe
  assert ema is None
  assert close(lr(0), 1e-6, 1e-3)
  assert close(lr(10 * spe), 1e-3, 1e-3)
  assert close(lr(run.total_steps), 1e-6, 1e-3)
  expected = deit_lr(105 * spe, 1e-3, spe, epochs=200, warmup_epochs=10, min_lr=1e-6)
  assert close(lr(105 * spe), expected, 1e-3)


# ---- every config: sizes follow --config.image_size, and its schedule is well formed.

CONFIG_ARGS = {"early_conv": "early_conv.py", "vit_b_srelu": "vit_b_srelu.py",
               "structured_init": "structured_init.py", "elpv": "elpv.py",
               "folder": "folder.py:classes=10",
               "finetune": "finetune.py:init=/weights.npz,model=vit_b16"}


def test_every_shipped_config_is_covered():
  assert set(CONFIG_ARGS) == {p.stem for p in (REPO / "configs").glob("*.py")}


@pytest.mark.parametrize("name", sorted(CONFIG_ARGS))
def test_preprocessing_follows_image_size(name):
  default = load(CONFIG_ARGS[name]).image_size
  config = load(CONFIG_ARGS[name], "--config.image_size=96")
  for train_side in (True, False):
    spec = files.pp_spec(config, train_side)
    assert "(96" in spec and f"({default}" not in spec and "{" not in spec, spec


@pytest.mark.parametrize("name", sorted(CONFIG_ARGS))
def test_schedule_peaks_at_lr_and_ends_at_its_floor(name):
  config = load(CONFIG_ARGS[name])
  num_train = IMAGENET_TRAIN if name in ("early_conv", "vit_b_srelu") else CIFAR10_TRAIN
  run, lr, _ = run_plan(config, num_train)
  steps = np.linspace(0, run.total_steps, 41).astype(int)
  values = np.array([lr(s) for s in steps])
  peak = int(np.argmax(values))
  assert values.max() <= optim.base_lr(config) * (1 + 1e-6) and values.min() >= 0
  if name == "finetune":  # DeiT fine-tunes at its floor lr after warmup: constant
    assert np.all(values[peak:] == values.max()), values
    return
  assert values[-1] < values.max() / 10, values  # decays
  assert np.all(np.diff(values[peak:]) <= 0), values  # monotone after the peak


def test_one_unit_on_the_command_line_clears_the_other():
  """The file's checkpoint_every_steps=1000 must not win over a command-line
  checkpoint_every_epochs=1, nor its warmup_steps over warmup_epochs."""
  config = load("elpv.py", "--config.checkpoint_every_epochs=1",
                "--config.schedule.warmup_epochs=2")
  run = train.durations(config, 1970)
  assert run.checkpoint_every == run.steps_per_epoch == 1970 // 64
  _, lr, _ = run_plan(config, 1970)
  assert lr(2 * run.steps_per_epoch) == pytest.approx(1e-3, rel=1e-6)
  assert lr(run.steps_per_epoch) == pytest.approx(0.5e-3, rel=1e-6)
  both = load("elpv.py", "--config.checkpoint_every_epochs=1",
              "--config.checkpoint_every_steps=7")
  with pytest.raises(errors.UserError, match="both set"):
    train.durations(both, 1970)


@pytest.mark.parametrize("opt, peak", [("adamw", 1e-3), ("sgd", 0.1)])
def test_elpv_sweep_budget_schedule(opt, peak):
  """README's ELPV stability sweeps: 200 steps, 20 linear warmup steps, cosine to 0."""
  config = load(f"elpv.py:opt={opt},size=48,depth=4,steps=200,warmup=20")
  run, lr, _ = run_plan(config, 1970)
  assert run.total_steps == 200
  for step in (0, 10, 20, 110, 199):
    expected = (peak * step / 20 if step < 20 else
                peak * 0.5 * (1 + math.cos(math.pi * (step - 20) / 180)))
    assert close(lr(step), expected, peak), step
