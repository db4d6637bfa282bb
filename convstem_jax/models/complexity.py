"""Parameters and multiply-adds per model, counted the pycls way.

Multiply-adds count convs, linears (bias adds included, as pycls does) and the two
attention matmuls (q k^T and attn v); norms, softmax, GELU and residual adds are left
out. Papers call these "FLOPs" (Xiao et al. Table 1 GFLOPs are GMACs at 224 px, 1000
classes). Parameters are counted from the model's own `init` shapes, so the report can
never drift from the code; `analytic_params` recounts them by formula as a check.

    python -m convstem_jax.models.complexity [--names vit_b16,vitc_4gf] [--img_size 224]
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import jax
import jax.numpy as jnp

from convstem_jax.models.variants import create_model, model_names
from convstem_jax.models.vit import ViT


@dataclasses.dataclass
class Complexity:
  params: int
  macs: int
  tokens: int

  def row(self, name: str) -> str:
    return f"{name:<16} {self.params / 1e6:>9.2f} {self.macs / 1e9:>9.2f} {self.tokens:>7d}"


def count_params(model: ViT) -> int:
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, model.img_size, model.img_size, 3))))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))


def analytic(model: ViT) -> tuple[int, int]:
  """(params, multiply-adds) of one forward pass on one image, by formula."""
  spec = model.stem_spec()
  params = macs = 0
  size, c_in = model.img_size, 3
  layers = [*spec.layers, dataclasses.replace(spec.projection, channels=model.width)]
  for l in layers:
    size = l.out_size(size)
    conv = l.kernel * l.kernel * c_in * l.channels
    params += conv + l.bias * l.channels + (l.norm != "none") * 2 * l.channels
    macs += (conv + l.bias * l.channels) * size * size
    c_in = l.channels
  d, n, f = model.width, size * size + (model.pool == "token"), model.mlp_dim
  params += (model.pool == "token") * d + (model.posemb == "learn") * n * d

  def linear(i, o, locations):
    nonlocal params, macs
    params += i * o + o
    macs += (i * o + o) * locations

  for _ in range(model.depth):
    params += 4 * d  # two LayerNorms
    linear(d, 3 * d, n)
    macs += 2 * n * n * d  # q k^T and attn v over all heads
    linear(d, d, n)
    linear(d, f, n)
    linear(f, d, n)
  params += 2 * d
  if model.num_classes:
    linear(d, model.num_classes, 1)
  return params, macs


def complexity(name: str, img_size: int | None = None, num_classes: int = 1000) -> Complexity:
  kw = {"num_classes": num_classes}
  if img_size:
    kw["img_size"] = img_size
  model = create_model(name, **kw)
  _, macs = analytic(model)
  return Complexity(count_params(model), macs, model.num_tokens)


def compiled_macs(model: ViT, batch: int = 1) -> float:
  """Multiply-adds of the compiled forward as XLA counts them (flops / 2), per image.
  Includes the elementwise work the analytic count leaves out but counts a bias add as
  half a multiply-add, so the two agree within a few percent."""
  x = jnp.zeros((batch, model.img_size, model.img_size, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  fwd = jax.jit(lambda v, x: model.apply(v, x)[0]).lower(variables, x).compile()
  cost = fwd.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"] / 2 / batch


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--names", default=",".join(model_names()),
                      help="comma-separated model names (default: all)")
  parser.add_argument("--img_size", type=int, default=None,
                      help="input size (default: each model's own, 224 or 32)")
  parser.add_argument("--num_classes", type=int, default=1000)
  args = parser.parse_args(argv)
  print(f"{'model':<16} {'params(M)':>9} {'GMACs':>9} {'tokens':>7}")
  for name in args.names.split(","):
    print(complexity(name, args.img_size, args.num_classes).row(name))


if __name__ == "__main__":
  main()
