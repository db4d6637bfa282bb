"""The model family: paper tables, stem layouts, BatchNorm, dtypes, errors, outputs."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convstem_jax.models import create_model, model_names
from convstem_jax.models import complexity
from convstem_jax.models import stems
from convstem_jax.models.vit import sincos2d

# (params, GMACs) at 224 px and 1000 classes. Exact DeiT counts from timm; Xiao et al.
# Table 1 (params in M, GMACs counted the pycls way, papers.md section 1); the
# scaled-ReLU ViT-B count is the reference figure.
EXACT_PARAMS = {"vit_ti16": 5_717_416, "vit_s16": 22_050_664, "vit_b16": 86_567_656,
                "vit_b16_srelu": 89_207_080}
XIAO_TABLE = {  # name: (M params, GMACs)
    "vitp_1gf": (4.83, 1.08), "vitc_1gf": (4.57, 1.08),
    "vitp_4gf": (18.51, 3.91), "vitc_4gf": (17.75, 3.97),
    "vitp_18gf": (86.57, 17.58), "vitc_18gf": (81.57, 17.73),
    "vitp_36gf": (178.36, 36.00), "vitc_36gf": (167.80, 35.03),
}
# Every other variant, pinned (pycls's dev/model_complexity.json habit): a change to any
# named model shows up here.
STORED = {
    "vit_l16": (304_326_632, 61.60), "vit_ti16_srelu": (6_439_912, 2.43),
    "vit_s16_srelu": (23_412_136, 5.90), "vitc_4gf_s1": (17_475_562, 3.92),
    "vitc_4gf_s2": (17_449_608, 3.95), "vitc_4gf_s3": (17_404_107, 3.99),
    "vitc_4gf_s4": (17_288_112, 3.94), "vit_ti2_32": (5_534_248, 1.67),
}


def tiny(name="vit_ti16", **kw):
  kw = {"depth": 2, "img_size": 32, "num_classes": 10, **kw}
  if name in ("vit_ti16", "vit_s16", "vit_b16"):
    kw.setdefault("patch_size", 4)  # an 8x8 grid at 32 px
  return create_model(name, **kw)


def init(model, batch=2, seed=0, train=False):
  x = jax.random.normal(jax.random.PRNGKey(seed + 1),
                        (batch, model.img_size, model.img_size, 3))
  return model.init(jax.random.PRNGKey(seed), x, train=train), x


def test_every_variant_is_covered_by_a_table():
  assert set(model_names()) == set(EXACT_PARAMS) | set(XIAO_TABLE) | set(STORED) | {
      "vit_b16", "vit_s16", "vit_ti16"}


@pytest.mark.parametrize("name", list(EXACT_PARAMS))
def test_exact_parameter_counts(name):
  c = complexity.complexity(name)
  assert c.params == EXACT_PARAMS[name]
  assert complexity.analytic(create_model(name))[0] == c.params


@pytest.mark.parametrize("name", list(XIAO_TABLE))
def test_xiao_table(name):
  params_m, gmacs = XIAO_TABLE[name]
  c = complexity.complexity(name)
  assert c.params / 1e6 == pytest.approx(params_m, rel=2e-3)
  assert c.macs / 1e9 == pytest.approx(gmacs, rel=3e-2)
  assert complexity.analytic(create_model(name))[0] == c.params


@pytest.mark.parametrize("name", list(STORED))
def test_stored_complexity(name):
  params, gmacs = STORED[name]
  c = complexity.complexity(name)
  assert c.params == params
  assert c.macs / 1e9 == pytest.approx(gmacs, abs=5e-3)


def test_vit_b16_forward_is_17_58_gmacs():
  assert complexity.complexity("vit_b16").macs / 1e9 == pytest.approx(17.58, abs=5e-3)


def test_compiled_forward_agrees_with_the_analytic_count():
  # XLA also counts softmax, GELU and norms (higher) but a bias add as one flop, half a
  # multiply-add of the analytic count (lower): they agree within a few percent.
  model = tiny("vitc_1gf", img_size=64, patch_size=16)
  analytic = complexity.analytic(model)[1]
  assert 0.95 * analytic <= complexity.compiled_macs(model) <= 1.08 * analytic


def test_complexity_cli_prints_every_model(capsys):
  complexity.main(["--names", "vit_ti16,vitc_4gf"])
  out = capsys.readouterr().out
  assert "vit_ti16" in out and "5.72" in out and "3.97" in out


def _kernels(params):
  stem = params["stem"]
  convs = sorted((k for k in stem if k.startswith("conv_")), key=lambda k: int(k[5:]))
  return [stem[k]["kernel"].shape for k in convs] + [stem["embedding"]["kernel"].shape]


@pytest.mark.parametrize("name, expected", [
    ("vitc_1gf", [(3, 3, 3, 24), (3, 3, 24, 48), (3, 3, 48, 96), (3, 3, 96, 192),
                  (1, 1, 192, 192)]),
    ("vitc_4gf", [(3, 3, 3, 48), (3, 3, 48, 96), (3, 3, 96, 192), (3, 3, 192, 384),
                  (1, 1, 384, 384)]),
    ("vitc_18gf", [(3, 3, 3, 64), (3, 3, 64, 128), (3, 3, 128, 128), (3, 3, 128, 256),
                   (3, 3, 256, 256), (3, 3, 256, 512), (1, 1, 512, 768)]),
    ("vitc_36gf", [(3, 3, 3, 64), (3, 3, 64, 128), (3, 3, 128, 128), (3, 3, 128, 256),
                   (3, 3, 256, 256), (3, 3, 256, 512), (1, 1, 512, 1024)]),
    ("vitc_4gf_s3", [(3, 3, 3, 17), (3, 3, 17, 34), (3, 3, 34, 68), (8, 8, 68, 136),
                     (1, 1, 136, 384)]),
    ("vit_b16_srelu", [(7, 7, 3, 64), (3, 3, 64, 64), (3, 3, 64, 64), (8, 8, 64, 768)]),
    ("vit_b16", [(16, 16, 3, 768)]),
])
def test_stem_kernel_shapes(name, expected):
  model = create_model(name)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 224, 224, 3))))
  assert _kernels(shapes["params"]) == expected


def test_conv_stem_layer_details():
  spec = create_model("vitc_18gf").stem_spec()
  assert [(l.kernel, l.stride, l.pad, l.bias, l.norm, l.act) for l in spec.layers[:2]] == [
      (3, 2, 1, False, "batch", "relu"), (3, 2, 1, False, "batch", "relu")]
  assert spec.projection.bias and spec.stride == 16
  srelu = create_model("vit_b16_srelu").stem_spec()
  assert [(l.kernel, l.stride, l.pad, l.channels) for l in srelu.layers] == [
      (7, 2, 3, 64), (3, 1, 1, 64), (3, 1, 1, 64)]
  assert not any(l.bias for l in srelu.layers) and srelu.proj_kernel == 8


@pytest.mark.parametrize("stem, norm, act", [
    ("srelu", "batch", "relu"), ("srelu_nonorm", "none", "relu"),
    ("srelu_norelu", "batch", "none"), ("srelu_ln", "layer", "relu")])
def test_scaled_relu_ablations(stem, norm, act):
  model = create_model("vit_s16_srelu", stem=stem)
  assert {(l.norm, l.act) for l in model.stem_spec().layers} == {(norm, act)}
  variables, x = init(tiny("vit_s16_srelu", stem=stem))
  assert ("batch_stats" in variables) == (norm == "batch")


def test_patchify_plus_scaled_relu():
  model = tiny("vit_ti16", stem="patchify_srelu")
  spec = model.stem_spec()
  assert [(l.kernel, l.stride, l.channels, l.norm, l.act, l.bias) for l in spec.layers] == [
      (4, 4, 192, "batch", "relu", False)]
  assert (spec.proj_kernel, spec.proj_stride) == (1, 1)
  variables, x = init(model)
  logits, _ = model.apply(variables, x)
  assert logits.shape == (2, 10)


def test_custom_layer_list_and_overrides():
  layers = [dict(kernel=3, stride=2, channels=16, norm="layer", act="gelu"),
            dict(kernel=3, stride=2, channels=32)]
  model = create_model("vit_ti16", stem=layers, patch_size=4, img_size=32, depth=1)
  variables, x = init(model)
  assert model.apply(variables, x)[1]["stem"].shape == (2, 8, 8, 192)
  wide = create_model("vit_ti16_srelu", stem_width=32, stem_norm="none")
  assert {(l.channels, l.norm) for l in wide.stem_spec().layers} == {(32, "none")}


def test_forward_outputs_and_intermediates():
  model = tiny("vitc_1gf", img_size=32, patch_size=16)
  variables, x = init(model)
  logits, out = model.apply(variables, x)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert out["stem"].shape == (2, 2, 2, 192)
  assert out["tokens"].shape == out["block_0"].shape == (2, 5, 192)
  assert out["pre_logits"].shape == (2, 192)
  assert set(out) >= {"block_0", "block_1", "encoded", "logits"}


def test_heads_are_zero_initialised_and_class_token_is_first():
  model = tiny()
  variables, x = init(model)
  logits, _ = model.apply(variables, x)
  np.testing.assert_array_equal(logits, 0)  # zero head: uniform start
  assert variables["params"]["pos_embedding"].shape == (1, 65, 192)


@pytest.mark.parametrize("style", ["jax", "pycls"])
def test_init_styles(style):
  model = tiny("vitc_1gf", img_size=32, patch_size=16, init_style=style)
  p, _ = init(model)
  p = p["params"]
  d = 192
  qkv = p["block_0"]["attn"]["qkv"]["kernel"]
  bound = np.sqrt(6 / (d + d)) if style == "jax" else np.sqrt(6 / (d + 3 * d))
  assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.9 * bound
  assert np.all(p["block_0"]["attn"]["qkv"]["bias"] == 0)
  mlp_bias = p["block_0"]["mlp"]["fc1"]["bias"]
  assert 0 < np.abs(mlp_bias).max() < 1e-5
  proj = p["stem"]["embedding"]["kernel"]  # 1x1 from 192 to 192 channels
  expected_std = np.sqrt(1 / 192) if style == "jax" else np.sqrt(2 / 192)
  assert np.std(proj) == pytest.approx(expected_std, rel=0.1)
  out_kernel = p["block_0"]["attn"]["out"]["kernel"]
  out_bound = np.sqrt(6 / (2 * d)) if style == "jax" else np.sqrt(1 / d)
  assert np.abs(out_kernel).max() <= out_bound


def test_pycls_patchify_init_std():
  model = tiny(init_style="pycls")
  p, _ = init(model)
  assert np.std(p["params"]["stem"]["embedding"]["kernel"]) == pytest.approx(
      np.sqrt(1 / (4 * 4 * 3)), rel=0.1)


def test_batchnorm_statistics_change_only_in_training():
  model = tiny("vitc_1gf", img_size=32, patch_size=16)
  variables, x = init(model)
  stats = variables["batch_stats"]
  assert set(stats["stem"]) == {"norm_0", "norm_1", "norm_2", "norm_3"}
  _, new = model.apply(variables, x, train=True, mutable=["batch_stats"],
                       rngs={"dropout": jax.random.PRNGKey(0)})
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), stats, new["batch_stats"])
  assert all(jax.tree.leaves(changed))
  # Eval uses and keeps the running statistics.
  (_, _), eval_vars = model.apply(variables, x, train=False, mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, stats, eval_vars["batch_stats"])


def test_batchnorm_momentum_and_unbiased_running_variance():
  bn = stems.BatchNorm()
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 3, 2)) * 3 + 1
  v = bn.init(jax.random.PRNGKey(0), x, train=False)
  _, new = bn.apply(v, x, train=True, mutable=["batch_stats"])
  flat = np.asarray(x).reshape(-1, 2)
  np.testing.assert_allclose(new["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-5)
  np.testing.assert_allclose(new["batch_stats"]["var"], 0.9 + 0.1 * flat.var(0, ddof=1),
                             rtol=1e-5)


def test_batchnorm_groups_normalise_each_group_separately():
  x = jnp.concatenate([jnp.zeros((2, 2, 2, 1)) + jnp.arange(2.).reshape(1, 2, 1, 1),
                       100 + 10 * jnp.arange(2.).reshape(1, 2, 1, 1) +
                       jnp.zeros((2, 2, 2, 1))])
  grouped = stems.BatchNorm(group_size=2)
  v = grouped.init(jax.random.PRNGKey(0), x, train=False)
  y_g, _ = grouped.apply(v, x, train=True, mutable=["batch_stats"])
  y_all, _ = stems.BatchNorm().apply(v, x, train=True, mutable=["batch_stats"])
  # Per group, both halves become the same standardised pattern (-1, +1).
  np.testing.assert_allclose(y_g[:2], y_g[2:], atol=1e-3)
  assert not np.allclose(y_all[:2], y_all[2:], atol=1e-1)
  with pytest.raises(ValueError, match="does not divide"):
    stems.BatchNorm(group_size=3).apply(v, x, train=True, mutable=["batch_stats"])


def test_bfloat16_forward_close_to_float32():
  f32 = tiny("vitc_1gf", img_size=32, patch_size=16)
  variables, x = init(f32)
  # A non-zero head so the logits carry the whole network's numerics.
  variables = jax.tree_util.tree_map_with_path(
      lambda p, a: jax.random.normal(jax.random.PRNGKey(3), a.shape) * 0.05
      if "head" in jax.tree_util.keystr(p) else a, variables)
  bf16 = tiny("vitc_1gf", img_size=32, patch_size=16, dtype="bfloat16")
  l32, _ = f32.apply(variables, x)
  l16, out16 = bf16.apply(variables, x)
  assert out16["block_0"].dtype == jnp.bfloat16 and l16.dtype == jnp.float32
  assert jax.tree.leaves(variables)[0].dtype == jnp.float32
  np.testing.assert_allclose(l16, l32, atol=0.05 * float(np.abs(l32).max()) + 1e-3)


def test_cudnn_request_falls_back_on_cpu(caplog):
  model = tiny(attention_impl="cudnn")
  variables, x = init(model)
  with caplog.at_level(logging.WARNING):
    got, _ = model.apply(variables, x)
  ref, _ = tiny(attention_impl="xla").apply(variables, x)
  np.testing.assert_allclose(got, ref, atol=1e-6)


def test_capture_attention_rows_sum_to_one_and_match_fused_path():
  model = tiny("vit_ti2_32", capture_attention=True)
  variables, x = init(model)
  variables = jax.tree_util.tree_map_with_path(
      lambda p, a: jax.random.normal(jax.random.PRNGKey(3), a.shape) * 0.05
      if "head" in jax.tree_util.keystr(p) else a, variables)
  (logits, _), state = model.apply(variables, x, mutable=["intermediates"])
  maps = [state["intermediates"][f"block_{i}"]["attn"]["attention_weights"][0]
          for i in range(2)]
  assert maps[0].shape == (2, 3, 256, 256)
  np.testing.assert_allclose(maps[0].sum(-1), 1.0, atol=1e-5)
  plain, _ = tiny("vit_ti2_32").apply(variables, x)
  np.testing.assert_allclose(logits, plain, atol=1e-5)


def test_vit_ti2_32_full_depth_attention_maps():
  model = create_model("vit_ti2_32", capture_attention=True)
  shapes = jax.eval_shape(lambda: model.apply(
      model.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3))),
      jnp.zeros((2, 32, 32, 3)), mutable=["intermediates"]))
  maps = jax.tree.leaves(shapes[1]["intermediates"])
  assert len(maps) == 12 and all(m.shape == (2, 3, 256, 256) for m in maps)
  assert "pos_embedding" not in jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]


def test_sincos_encoding_layout():
  pe = sincos2d(4, 8)
  # token (r, c) = row r*4 + c; layout [sin y, sin x, cos y, cos x], 2 bands each.
  r, c = 2, 3
  bands = 1.0 / 10_000 ** (np.arange(2) / 2)
  expected = np.concatenate([np.sin(r * bands), np.sin(c * bands),
                             np.cos(r * bands), np.cos(c * bands)])
  np.testing.assert_allclose(pe[r * 4 + c], expected, rtol=1e-6)


def test_dropout_and_drop_path_only_in_training():
  model = tiny(dropout=0.1, drop_path=0.2, attention_dropout=0.1)
  variables, x = init(model)
  variables = jax.tree_util.tree_map_with_path(
      lambda p, a: jax.random.normal(jax.random.PRNGKey(3), a.shape) * 0.05
      if "head" in jax.tree_util.keystr(p) else a, variables)
  e1, _ = model.apply(variables, x)
  e2, _ = model.apply(variables, x)
  np.testing.assert_array_equal(e1, e2)
  t1, _ = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  t2, _ = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  assert not np.allclose(t1, t2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="vit_huge"), "Unknown model 'vit_huge'; valid names: vit_ti16"),
    (dict(name="vitc_4gf", patch_size=8), "strides multiply to 16, not the patch size 8"),
    (dict(name="vit_b16", img_size=200), "not divisible by the stem's total stride 16"),
    (dict(name="vit_b16", num_heads=5), "num_heads 5 does not divide the width 768"),
    (dict(name="vit_b16", stem="magic"), "Unknown stem 'magic'; valid stems"),
    (dict(name="vit_b16", pool="max"), "pool 'max' is not one of"),
    (dict(name="vit_b16", init_style="torch"), "Unknown init 'torch'"),
    (dict(name="vit_b16", colour=True), r"Unknown model override\(s\) \['colour'\]"),
    (dict(name="vit_s16", stem="conv_4gf", width=192), "ends at width 384"),
    (dict(name="vitc_1gf", stem_weight_grad="fast"), "stem_weight_grad 'fast' is not one"),
])
def test_bad_requests_fail_at_construction(kwargs, match):
  name = kwargs.pop("name")
  with pytest.raises(ValueError, match=match):
    create_model(name, **kwargs)


def test_wrong_input_size_is_a_clear_error():
  model = tiny()
  variables, _ = init(model)
  with pytest.raises(ValueError, match="Expected NHWC images of 32x32"):
    model.apply(variables, jnp.zeros((1, 64, 64, 3)))


@pytest.mark.parametrize("kernel, stride, pad, bias", [
    (3, 2, 1, False), (3, 1, 1, False), (7, 2, 3, False), (4, 4, 0, True), (1, 1, 0, True)])
def test_stem_conv_matches_flax_conv_and_its_tap_gradient_matches_xla(kernel, stride, pad,
                                                                      bias):
  """`stems.Conv` with XLA's gradient is flax's nn.Conv bit for bit (forward and every
  gradient), so runs from before the switch repeat exactly; 'taps' changes only the
  kernel gradient, and only by float rounding."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 17, 17, 16))
  init = jax.nn.initializers.lecun_normal()
  flax_conv = nn.Conv(8, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                      use_bias=bias, kernel_init=init)
  convs = {how: stems.Conv(8, kernel, stride, pad, bias, init, how)
           for how in ("xla", "taps", "im2col")}
  variables = flax_conv.init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(convs["taps"].init(jax.random.PRNGKey(0), x)) == \
      jax.tree.structure(variables)

  def grads(module):
    loss = lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)) * jnp.arange(8.0))
    return module.apply(variables, x), jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x)

  y_ref, (dv_ref, dx_ref) = grads(flax_conv)
  y, (dv, dx) = grads(convs["xla"])
  assert y.tobytes() == y_ref.tobytes() and dx.tobytes() == dx_ref.tobytes()
  assert all(a.tobytes() == b.tobytes() for a, b in
             zip(jax.tree.leaves(dv), jax.tree.leaves(dv_ref)))
  for how in ("taps", "im2col"):
    y, (dv, dx) = grads(convs[how])
    assert y.tobytes() == y_ref.tobytes() and dx.tobytes() == dx_ref.tobytes()
    kernel_grad, ref = dv["params"]["kernel"], dv_ref["params"]["kernel"]
    assert kernel_grad.tobytes() != ref.tobytes()  # really another computation
    np.testing.assert_allclose(kernel_grad, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(),
                               err_msg=how)


@pytest.mark.parametrize("name", ["vitc_1gf", "vit_ti16_srelu", "vitp_1gf"])
def test_stem_weight_grad_switch_keeps_parameters_and_gradients(name):
  """Every stem family: the same parameters at init, gradients within float rounding."""
  models = {how: tiny(name, stem_weight_grad=how)
            for how in ("xla", "taps", "im2col", "auto")}
  out = {}
  for how, model in models.items():
    variables, x = init(model, batch=4, train=True)

    def loss(params):
      (logits, _), _ = model.apply({**variables, "params": params}, x, train=True,
                                   mutable=["batch_stats"])
      return jnp.sum(logits ** 2)

    out[how] = variables, jax.jit(jax.grad(loss))(variables["params"])
  for how in ("taps", "im2col", "auto"):  # 'auto' is 'taps' on this CPU
    assert jax.tree.all(jax.tree.map(lambda a, b: a.tobytes() == b.tobytes(),
                                     out[how][0], out["xla"][0]))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(out[how][1]),
                            jax.tree.leaves(out["xla"][1])):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * np.abs(b).max(),
                                 err_msg=jax.tree_util.keystr(path))


def test_gelu_is_the_exact_gelu():
  """PyTorch's erf form (models.stems.gelu) against jax.nn.gelu's erfc form; the tanh
  approximation is 1e-4 away, so the bound tells the two forms apart."""
  x = jnp.linspace(-8.0, 8.0, 100_001, dtype=jnp.float32)
  exact = jax.nn.gelu(x, approximate=False)
  assert float(jnp.max(jnp.abs(stems.gelu(x) - exact))) < 2e-6
  grad = jax.vmap(jax.grad(stems.gelu))(x)
  assert float(jnp.max(jnp.abs(grad - jax.vmap(jax.grad(
      lambda v: jax.nn.gelu(v, approximate=False)))(x)))) < 2e-6
  assert float(jnp.max(jnp.abs(jax.nn.gelu(x, approximate=True) - exact))) > 1e-4
