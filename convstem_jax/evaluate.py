"""Exact evaluation (during training, from a checkpoint or imported weights), precise BN.

Eval batches are padded to whole batches with a mask on every host, so each example of
a split counts exactly once whatever the host count or batch size. Sums (loss, top-1,
top-5, count) accumulate on the device and are read once per split. Top-5 is reported
only with more than 5 classes (with 5 or fewer it is always 1.0 and says nothing).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from convstem_jax import checkpoint as ckpt_lib
from convstem_jax import data as data_lib
from convstem_jax import errors
from convstem_jax import sharding as shd
from convstem_jax import weights
from convstem_jax.models import model_from_config
from convstem_jax import config as config_lib
from convstem_jax.models.stems import BatchNorm


def _sums(logits, labels, mask):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  loss = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  sums = {"loss": jnp.sum(loss * mask),
          "accuracy": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
          "count": jnp.sum(mask)}
  if logits.shape[-1] > 5:
    top5 = jax.lax.top_k(logits, 5)[1]
    sums["top5"] = jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask)
  return sums


def make_eval_step(model):
  """eval_step(params, batch_stats, batch) -> summed loss / top-1 / top-5 / count over
  the batch's unmasked examples (not yet jitted; tools/benchmark.py times it too)."""
  def eval_step(params, batch_stats, batch):
    logits, _ = model.apply({"params": params, "batch_stats": batch_stats},
                            batch["image"], train=False)
    return _sums(logits, batch["label"], batch["mask"])
  return eval_step


class Evaluator:
  """Top-1 / top-5 / loss on each of `config.eval_splits`, for raw and EMA weights."""

  def __init__(self, config, model, mesh, train_source=None):
    self.config, self.model, self.mesh = config, model, mesh
    self.splits = tuple(config.eval_splits)
    self.sources = {s: data_lib.get_source(config, s) for s in self.splits}
    self.local_bs = shd.local_batch_size(config.get("eval_batch_size", config.batch_size))
    self.train_source = train_source
    self.precise_bn_images = config_lib.get(config, "precise_bn_images")

    def bn_step(params, batch_stats, batch):
      # Running stats start at zero, so one update leaves (1 - momentum) x batch stats.
      zero = jax.tree.map(jnp.zeros_like, batch_stats)
      _, new = model.apply({"params": params, "batch_stats": zero}, batch["image"],
                           train=True, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.PRNGKey(0)})
      return jax.tree.map(lambda s: s / (1 - BatchNorm.momentum), new["batch_stats"])

    self.eval_step = jax.jit(make_eval_step(model), out_shardings=shd.replicated(mesh))
    self.bn_step = jax.jit(bn_step)

  def precise_bn(self, params, batch_stats):
    """BatchNorm statistics recomputed on `precise_bn_images` training images (pycls)."""
    if not self.precise_bn_images or not jax.tree.leaves(batch_stats):
      return batch_stats
    bs = self.config.batch_size
    n = max(1, -(-self.precise_bn_images // bs))
    # A fixed stream far from the training steps: the same images at every eval.
    batches = self.train_source.train_batches(shd.local_batch_size(bs), start_step=10**8)
    total = None
    for _ in range(n):
      stats = self.bn_step(params, batch_stats, shd.global_batch(next(batches), self.mesh))
      moments = _map_bn(lambda s: {**s, "sq": jnp.square(s["mean"])}, stats)
      total = moments if total is None else jax.tree.map(jnp.add, total, moments)
    # Law of total variance over the batches: E[var_b] + Var[mean_b].
    return _map_bn(lambda s: {"mean": s["mean"] / n,
                              "var": s["var"] / n + s["sq"] / n - jnp.square(s["mean"] / n)},
                   total)

  def evaluate_split(self, split, params, batch_stats) -> dict[str, float]:
    total = None
    for batch in self.sources[split].eval_batches(self.local_bs):
      sums = self.eval_step(params, batch_stats, shd.global_batch(batch, self.mesh))
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    total = jax.device_get(total)
    count = float(total.pop("count"))
    out = {k: float(v) / count for k, v in total.items()}
    out["count"] = count
    return out

  def run(self, params, batch_stats, ema=None) -> dict[str, float]:
    weights = {"": (params, batch_stats)}
    if ema:
      weights["_ema"] = (ema["params"], ema["batch_stats"])
    results = {}
    for suffix, (p, bs) in weights.items():
      bs = self.precise_bn(p, bs)
      for split in self.splits:
        for k, v in self.evaluate_split(split, p, bs).items():
          results[f"{split}{suffix}/{k}"] = v
    return results


def _map_bn(fn, tree):
  """Applies fn to every BatchNorm statistics node ({'mean', 'var', ...}) of a tree."""
  if isinstance(tree, dict) and "mean" in tree and "var" in tree:
    return fn(tree)
  return {k: _map_bn(fn, v) for k, v in tree.items()}


def evaluate_checkpoint(config, workdir: str, checkpoint: str = "") -> dict[str, float]:
  """--mode=eval: evaluate every split with a run's weights, or with imported ones.

  `checkpoint`: '' (the workdir's latest; with no checkpoint there, `config.init_from`:
  imported weights evaluated as they are), a step number, or a path to a workdir /
  checkpoints dir / step dir. Only params, batch_stats and EMA weights are read.
  """
  mesh = shd.make_mesh(config.mesh)
  model = model_from_config(config)
  if (not checkpoint and config_lib.get(config, "init_from")
      and not ckpt_lib.checkpoint_dir(workdir).exists()):
    return _evaluate_imported(config, model, mesh, workdir)
  if checkpoint.isdigit():
    ckpt, step = ckpt_lib.resolve(workdir, int(checkpoint))
  else:
    ckpt, step = ckpt_lib.resolve(checkpoint or workdir)
  x = jnp.zeros((1, model.img_size, model.img_size, 3))
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  abstract = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
  saved = ckpt.model_shapes(step)
  if saved.get("ema"):
    abstract["ema"] = dict(abstract)
  shardings = shd.state_shardings(abstract, mesh, config_lib.get(config, "fsdp"))
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  t0 = time.perf_counter()
  restored = ckpt.restore_model(step, target)
  logging.info("Restored step %d in %.2fs", step, time.perf_counter() - t0)
  results = _evaluator(config, model, mesh).run(
      restored["params"], restored["batch_stats"], restored.get("ema"))
  results["step"] = step
  _write(workdir, f"eval_{step}.json", results)
  return results


def _evaluate_imported(config, model, mesh, workdir: str) -> dict[str, float]:
  """Imported weights (config.init_from), evaluated without training."""
  if config_lib.get(config, "init_from_fresh"):
    raise errors.UserError("--mode=eval of imported weights with init_from_fresh set would "
                           "score fresh variables; fine-tune first, or unset it.")
  variables = weights.load_variables(config.init_from, model,
                                     ema=config_lib.get(config, "init_from_ema"))
  variables.setdefault("batch_stats", {})
  shardings = shd.state_shardings(variables, mesh, config_lib.get(config, "fsdp"))
  placed = jax.tree.map(weights.load.put, variables, shardings)
  logging.info("Evaluating the weights of %s as imported.", config.init_from)
  results = _evaluator(config, model, mesh).run(placed["params"], placed["batch_stats"])
  results["init_from"] = config.init_from
  _write(workdir, "eval_init_from.json", results)
  return results


def _evaluator(config, model, mesh) -> Evaluator:
  train_source = (data_lib.get_source(config, config_lib.get(config, "train_split"))
                  if config_lib.get(config, "precise_bn_images") else None)
  return Evaluator(config, model, mesh, train_source=train_source)


def _write(workdir: str, name: str, results: dict) -> None:
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    (epath.Path(workdir) / name).write_text(json.dumps(results, indent=2))
