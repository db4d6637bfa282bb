"""Every measure of `measures.py`, layer by layer, for one model on real images.

  images = eval_images(config, 64)             # the first eval images, eval preprocessing
  result = analyse(model, variables, images)   # a JSON-able dict (and "_maps" for figures)
  scalars(result)                              # {"diagnostics/<measure>/<layer>": float}

Layers: the stem output (its patch tokens) and every block's output. Tokens measures
use the patch tokens only (class token left out); attention measures follow
`measures.py` (class-token rows and columns dropped, rows renormalised, their mass
reported). The impulse score (`attention.score_attention`, window 3, interior queries)
and the attention maps kept for figures use the first batch of images only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from convstem_jax import config as config_lib
from convstem_jax import data as data_lib
from convstem_jax.diagnostics import attention as attention_lib
from convstem_jax.diagnostics import measures


def eval_images(config, n: int) -> np.ndarray:
  """The first `n` images of the config's first eval split, preprocessed for eval."""
  split = config_lib.get(config, "eval_splits")[0]
  out, have = [], 0
  for batch in data_lib.get_source(config, split).eval_batches(min(n, 64)):
    images = batch["image"][batch["mask"] > 0]
    out.append(images[:n - have])
    have += len(out[-1])
    if have >= n:
      break
  return np.concatenate(out)


def _forward(model):
  @jax.jit
  def run(variables, images):
    (_, out), state = model.apply(variables, images, train=False, mutable=["intermediates"])
    inter = state["intermediates"]
    maps = [inter[f"block_{i}"]["attn"]["attention_weights"][0] for i in range(model.depth)]
    b, h, w, d = out["stem"].shape
    tokens = [out["stem"].reshape(b, h * w, d)] + [out[f"block_{i}"]
                                                   for i in range(model.depth)]
    return tokens, maps
  return run


def analyse(model, variables: dict, images: np.ndarray, batch: int = 16,
            window: int = 3, keep_maps: int = 4) -> dict:
  """Measures of `model` (any ViT of ours) with `variables` on NHWC `images`."""
  model = model.clone(capture_attention=True)
  prefix = 1 if model.pool == "token" else 0
  grid = model.grid
  patch = model.img_size / grid
  run = _forward(model)
  sums: dict[str, list] = {}
  first_maps = None
  count = 0
  for start in range(0, len(images), batch):
    x = jnp.asarray(images[start:start + batch], jnp.float32)
    tokens, maps = jax.device_get(run(variables, x))
    n = len(x)
    per_image = {
        "token_similarity": [measures.token_similarity(t[:, prefix if i else 0:])
                             for i, t in enumerate(tokens)],
        "rank_collapse_ratio": [measures.rank_collapse_ratio(t[:, prefix if i else 0:])
                                for i, t in enumerate(tokens)],
        "mean_attention_distance_px": [measures.mean_attention_distance(m, grid, patch,
                                                                         prefix)
                                       for m in maps],
        "attention_entropy": [measures.attention_entropy(m, prefix) for m in maps],
        "class_token_mass": [measures.class_token_mass(m, prefix) for m in maps],
    }
    for key, values in per_image.items():
      weighted = [np.asarray(v, np.float64) * n for v in values]
      sums[key] = weighted if key not in sums else [a + b for a, b in
                                                    zip(sums[key], weighted)]
    if first_maps is None:
      first_maps = [np.asarray(m) for m in maps]
    count += n
  out = {key: [np.asarray(v / count).tolist() for v in values]
         for key, values in sums.items()}
  if not prefix:
    del out["class_token_mass"]
  n = grid * grid
  out.update(layers=["stem"] + [f"block_{i}" for i in range(model.depth)],
             images=count, grid=grid, patch_px=patch, class_tokens=prefix,
             uniform_distance_px=float(measures.patch_distances(grid, patch).mean()),
             uniform_entropy=math.log(n))
  if grid > 2 * (window // 2):
    out["impulse"] = [[{"offset": list(s.offset), "argmax_fraction": s.argmax_fraction,
                        "mass": s.mass} for s in attention_lib.score_attention(
                            measures.patch_attention(m, prefix), grid, window)]
                      for m in first_maps]
  out["_maps"] = [m[:keep_maps] for m in first_maps]  # for figures, not for JSON
  return out


# Per-layer measures as scalars; per-head ones averaged over heads (the JSON keeps them).
SCALARS = ("token_similarity", "rank_collapse_ratio", "mean_attention_distance_px",
           "attention_entropy", "class_token_mass")


def scalars(result: dict) -> dict[str, float]:
  """{'diagnostics/<measure>/<layer>': value} for metrics.jsonl and TensorBoard."""
  out = {}
  for measure in SCALARS:
    values = result.get(measure)
    if values is None:
      continue
    layers = result["layers"][len(result["layers"]) - len(values):]  # blocks only
    for layer, v in zip(layers, values):
      out[f"diagnostics/{measure}/{layer}"] = float(np.mean(v))
  return out
