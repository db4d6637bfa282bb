"""Numerical parity with timm: timm weights -> `weights.timm_to_flax` -> same outputs.

Needs PyTorch and timm (`pip install -e ".[parity]"`). Where torchvision cannot be
imported (some registries have no working CPU build), the stand-in under tests/stubs
supplies the names timm's import touches; it is never used for computation.
"""

import functools
import importlib
import importlib.util

import numpy as np
import pytest

from stub_util import ensure_importable

torch = pytest.importorskip(
    "torch", reason='parity tests need PyTorch (CPU is enough): pip install -e ".[parity]"')

_TIMM_REASON = 'parity tests need timm: pip install -e ".[parity]"'
if importlib.util.find_spec("timm") is None:
  pytest.importorskip("timm", reason=_TIMM_REASON)  # skips: timm is not installed
# timm is installed: from here on an import error is a real failure, not a skip.
ensure_importable("torchvision")
import timm  # noqa: E402
from timm.layers import HybridEmbed  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from timm.models.vision_transformer_hybrid import ConvStem  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from convstem_jax.models import ViT, create_model  # noqa: E402
from convstem_jax.weights import timm_to_flax  # noqa: E402

TOL = 1e-5


def _perturb(model, seed: int = 0):
  """Randomise what timm initialises to constants (biases, norms, cls token, head, BN
  statistics), so every converted tensor influences the outputs."""
  gen = torch.Generator().manual_seed(seed)
  rand = lambda t, std: torch.randn(t.shape, generator=gen) * std
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or name in ("cls_token", "pos_embed") or "head" in name:
        p.copy_(rand(p, 0.1))
      elif p.ndim == 1:  # norm scales
        p.copy_(1.0 + rand(p, 0.1))
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(rand(m.running_mean, 0.2))
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
  return model.eval()


def _compare(timm_model, ours: ViT, img_size: int, seed: int = 0) -> dict:
  """Run both on the same random batch of 2; return max abs errors per output."""
  x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))
  with torch.no_grad():
    stem = timm_model.patch_embed(x)  # [B, N, d]
    feats = timm_model.forward_features(x)
    pre = timm_model.forward_head(feats, pre_logits=True)
    logits = timm_model.forward_head(feats)
  variables = timm_to_flax(timm_model.state_dict(), ours)
  with jax.default_matmul_precision("highest"):
    got, out = jax.jit(functools.partial(ours.apply, train=False))(
        variables, jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
  b, h, w, d = out["stem"].shape
  err = lambda a, t: float(np.max(np.abs(np.asarray(a) - t.numpy())))
  # timm's forward_features ends in `norm`, which average-pooling models leave out.
  encoded = out["encoded"] if ours.pool == "token" else out[f"block_{ours.depth - 1}"]
  errors = {"stem": err(out["stem"].reshape(b, h * w, d), stem),
            "encoded": err(encoded, feats),
            "pre_logits": err(out["pre_logits"], pre),
            "logits": err(got, logits)}
  print(f"{type(ours).__name__}({ours.stem}) max abs errors: {errors}")
  assert float(np.max(np.abs(logits.numpy()))) > 0.1  # the check is not vacuous
  return errors


def _assert_close(errors: dict):
  bad = {k: v for k, v in errors.items() if not v <= TOL}
  assert not bad, f"outputs differ by more than {TOL}: {bad}"


def test_vit_ti16_matches_timm():
  torch.manual_seed(0)
  tm = _perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False))
  _assert_close(_compare(tm, create_model("vit_ti16"), 224))


def test_conv_stem_1gf_matches_timm_convstem():
  # Xiao et al. 1GF stem as timm's own ConvStem: four 3x3/2 conv(no bias)-BN-ReLU, then
  # a biased 1x1 conv to d; HybridEmbed(proj=False) uses it as the whole patch embedding.
  torch.manual_seed(1)
  stem = ConvStem(in_chans=3, depth=5, channels=(24, 48, 96, 192, 192),
                  kernel_size=(3, 3, 3, 3, 1), stride=(2, 2, 2, 2, 1))
  tm = VisionTransformer(img_size=64, patch_size=1, embed_dim=192, depth=2, num_heads=3,
                         mlp_ratio=3.0, num_classes=10,
                         embed_layer=functools.partial(HybridEmbed, backbone=stem,
                                                       proj=False))
  _perturb(tm, seed=1)
  ours = create_model("vitc_1gf", depth=2, img_size=64, num_classes=10)
  _assert_close(_compare(tm, ours, 64, seed=1))


def test_scaled_relu_stem_matches_timm_hybrid():
  # Wang et al. scaled-ReLU stem: 7x7/2 -> 3x3 -> 3x3 at width 64 (conv, BN, ReLU), then
  # HybridEmbed's 8x8/8 biased projection to d.
  torch.manual_seed(2)
  nn = torch.nn
  layers = []
  for c_in, k, s in ((3, 7, 2), (64, 3, 1), (64, 3, 1)):
    layers += [nn.Conv2d(c_in, 64, k, s, k // 2, bias=False), nn.BatchNorm2d(64),
               nn.ReLU()]
  tm = VisionTransformer(img_size=64, patch_size=8, embed_dim=192, depth=2, num_heads=3,
                         num_classes=10,
                         embed_layer=functools.partial(HybridEmbed,
                                                       backbone=nn.Sequential(*layers)))
  _perturb(tm, seed=2)
  ours = create_model("vit_ti16_srelu", depth=2, img_size=64, num_classes=10)
  _assert_close(_compare(tm, ours, 64, seed=2))


def test_average_pooling_matches_timm_fc_norm():
  # No class token, mean over tokens, then timm's fc_norm (our encoder_norm).
  torch.manual_seed(4)
  tm = _perturb(VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2,
                                  num_heads=2, num_classes=10, global_pool="avg",
                                  class_token=False), seed=4)
  ours = ViT(img_size=32, patch_size=4, width=64, depth=2, num_heads=2, mlp_dim=256,
             num_classes=10, pool="gap")
  _assert_close(_compare(tm, ours, 32, seed=4))


def test_explicit_attention_path_matches_timm():
  # capture_attention=True takes the einsum/softmax path instead of dot_product_attention.
  tm = _perturb(_tiny_timm(), seed=5)
  ours = _tiny_ours(capture_attention=True)
  x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
  with torch.no_grad():
    want = tm(x).numpy()
  with jax.default_matmul_precision("highest"):
    (got, _), state = ours.apply(timm_to_flax(tm.state_dict(), ours),
                                 jnp.asarray(x.permute(0, 2, 3, 1).numpy()), train=False,
                                 mutable=["intermediates"])
  weights = state["intermediates"]["block_0"]["attn"]["attention_weights"][0]
  assert weights.shape == (2, 2, 5, 5)
  err = float(np.max(np.abs(np.asarray(got) - want)))
  print(f"explicit attention path max abs logit error: {err}")
  assert err <= TOL


def test_sincos2d_matches_timm():
  from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
  from convstem_jax.models.vit import sincos2d
  np.testing.assert_allclose(sincos2d(4, 64), build_sincos2d_pos_embed([4, 4], 64).numpy(),
                             atol=1e-6)


# --- conversion errors --------------------------------------------------------------

def _tiny_timm():
  torch.manual_seed(3)
  return VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=1,
                           num_heads=2, num_classes=10)


def _tiny_ours(**kw):
  return ViT(**{**dict(img_size=32, patch_size=16, width=64, depth=1, num_heads=2,
                       mlp_dim=256, num_classes=10), **kw})


def test_numpy_state_dict_converts_like_tensors():
  sd = _tiny_timm().state_dict()
  a = timm_to_flax(sd, _tiny_ours())
  b = timm_to_flax({k: v.numpy() for k, v in sd.items()}, _tiny_ours())
  assert set(a) == {"params"}  # patchify: no BatchNorm, no batch_stats
  jax.tree.map(np.testing.assert_array_equal, a, b)
  qkv = sd["blocks.0.attn.qkv.weight"].numpy()
  np.testing.assert_array_equal(a["params"]["block_0"]["attn"]["qkv"]["kernel"], qkv.T)


def test_width_mismatch_raises():
  with pytest.raises(ValueError, match=r"shape") as e:
    timm_to_flax(_tiny_timm().state_dict(), _tiny_ours(width=96, num_heads=3))
  assert "pos_embed" in str(e.value) and "block_0/attn/qkv/kernel" in str(e.value)


def test_missing_and_unexpected_keys_are_named():
  sd = dict(_tiny_timm().state_dict())
  del sd["head.bias"]
  sd["blocks.0.ls1.gamma"] = torch.ones(64)
  with pytest.raises(ValueError) as e:
    timm_to_flax(sd, _tiny_ours())
  assert "blocks.0.ls1.gamma" in str(e.value) and "head/bias" in str(e.value)
  with pytest.raises(ValueError, match="missing from the file") as e:
    timm_to_flax(_tiny_timm().state_dict(), _tiny_ours(depth=2))
  for leaf in ("norm1/scale", "attn/qkv/kernel", "attn/out/bias", "mlp/fc2/kernel"):
    assert f"params/block_1/{leaf}" in str(e.value)


def test_conv_stem_weights_into_patchify_model_raise():
  stem = ConvStem(in_chans=3, depth=2, channels=(32, 64), kernel_size=(3, 1),
                  stride=(2, 1))
  tm = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2,
                         num_classes=10,
                         embed_layer=functools.partial(HybridEmbed, backbone=stem))
  with pytest.raises(ValueError, match="stem"):
    timm_to_flax(tm.state_dict(), _tiny_ours())
  with pytest.raises(ValueError, match="patchify embedding"):
    timm_to_flax(_tiny_timm().state_dict(), _tiny_ours(stem="patchify_srelu"))
