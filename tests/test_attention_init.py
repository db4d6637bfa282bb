"""Structured attention initialisation (issue 6): impulse, closed-form impulse, mimetic.

The checks of the issue: `vit_ti2_32` with `capture_attention=True` on a blank 32x32
image at initialisation; block 0's attention against impulse targets. The fits run at
their production length (10,000 Adam steps, about ten seconds each on a CPU).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from convstem_jax.diagnostics import blank_image_attention, score_attention, score_model
from convstem_jax.models import create_model
from convstem_jax.models import structured_init as si
from convstem_jax.models.vit import LN_EPS, sincos2d

KINDS = si.KINDS


def blank(model, batch=1):
  return jnp.zeros((batch, model.img_size, model.img_size, 3), jnp.float32)


@functools.lru_cache(maxsize=None)
def ti_init(kind):
  """vit_ti2_32's variables for `kind`, seed 0 (cached: each fit runs once)."""
  model = create_model("vit_ti2_32", capture_attention=True, attention_init=kind)
  return model, model.init(jax.random.PRNGKey(0), blank(model))


@functools.lru_cache(maxsize=None)
def block0(kind):
  model, variables = ti_init(kind)
  window = si.window(kind) if si.is_impulse(kind) else 3
  return score_attention(blank_image_attention(model, variables)[0], model.grid, window)


def qkv(variables, block=0):
  return variables["params"][f"block_{block}"]["attn"]["qkv"]["kernel"]


@pytest.mark.parametrize("kind", ["impulse3", "impulse5", "impulse3_closed",
                                  "impulse5_closed"])
def test_impulse_heads_hit_their_offset(kind):
  f = si.window(kind)
  for h in block0(kind):
    assert max(abs(h.offset[0]), abs(h.offset[1])) <= f // 2
    assert h.argmax_fraction >= 0.8, h
    assert h.mass >= 0.06, h


@pytest.mark.parametrize("f", [3, 5])
def test_closed_form_is_sharper_than_the_fit(f):
  fitted = block0(f"impulse{f}")
  closed = block0(f"impulse{f}_closed")
  assert min(h.mass for h in closed) > max(h.mass for h in fitted)


def test_closed_form_offsets_are_fixed_centre_first():
  assert [h.offset for h in block0("impulse3_closed")] == [(0, 0), (-1, 0), (0, 1)]
  assert si.closed_offsets(9, 3).tolist() == [[0, 0], [-1, 0], [0, 1], [0, -1], [1, 0],
                                              [-1, -1], [-1, 1], [1, -1], [1, 1]]
  five = si.closed_offsets(25, 5)
  assert len({tuple(o) for o in five}) == 25 and np.abs(five).max() == 2


def test_mimetic_attends_to_itself_default_is_uniform():
  assert min(h.self_attention for h in block0("mimetic")) >= 0.02
  assert max(h.self_attention for h in block0("default")) <= 0.01


def test_every_layer_shares_the_impulse_solution():
  _, variables = ti_init("impulse3")
  d = 192
  k0, k5 = qkv(variables, 0), qkv(variables, 5)
  np.testing.assert_array_equal(k0[:, :2 * d], k5[:, :2 * d])
  assert not np.allclose(k0[:, 2 * d:], k5[:, 2 * d:])  # v keeps its own draw
  m0, m5 = qkv(ti_init("mimetic")[1], 0), qkv(ti_init("mimetic")[1], 5)
  assert not np.allclose(m0, m5)  # mimetic draws per layer


def test_mimetic_products():
  model, variables = ti_init("mimetic")
  d, heads = model.width, model.num_heads
  r = d // heads
  attn = variables["params"]["block_0"]["attn"]
  w = attn["qkv"]["kernel"]
  # W_q W_k^T per head is a rank-r matrix close to 0.7 Z + 0.7 I: its trace ~ 0.7 * r
  # from the identity's top-r part; W_v W_o is exactly 0.4 Z - 0.4 I: trace ~ -0.4 d.
  for h in range(heads):
    qk = w[:, h * r:(h + 1) * r] @ w[:, d + h * r:d + (h + 1) * r].T
    assert np.linalg.matrix_rank(np.asarray(qk), tol=1e-4) == r
    assert 0.5 * r < float(jnp.trace(qk)) < 1.5 * r
  vo = w[:, 2 * d:] @ attn["out"]["kernel"]
  assert float(jnp.trace(vo)) == pytest.approx(-0.4 * d, rel=0.15)
  off = np.asarray(vo) + 0.4 * np.eye(d)
  assert float(off.std() * np.sqrt(d)) == pytest.approx(0.4, rel=0.15)  # Z var 1/D


def test_same_seed_same_weights_other_seed_other_weights():
  for kind in ("mimetic", "impulse5_closed"):
    model = create_model("vit_ti2_32", depth=2, attention_init=kind)
    a = model.init(jax.random.PRNGKey(3), blank(model))
    b = model.init(jax.random.PRNGKey(3), blank(model))
    c = model.init(jax.random.PRNGKey(4), blank(model))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.allclose(qkv(a), qkv(c))
  x = si.pseudo_input(sincos2d(8, 64), LN_EPS)
  one = si.fit_impulse(jax.random.PRNGKey(0), x, heads=2, f=3, steps=300)
  two = si.fit_impulse(jax.random.PRNGKey(0), x, heads=2, f=3, steps=300)
  jax.tree.map(np.testing.assert_array_equal, one, two)


def test_eval_shape_and_sharded_jit_init():
  model, eager = ti_init("impulse3")
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), blank(model)))
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(jnp.shape, eager)
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  replicated = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), shapes)
  init = jax.jit(lambda rng: model.init(rng, blank(model)), out_shardings=replicated)
  jitted = init(jax.random.PRNGKey(0))
  # 10,000 Adam steps amplify last-bit differences between XLA's fused and eager
  # programs; the solution is the same up to that.
  np.testing.assert_allclose(qkv(jitted), qkv(eager), atol=2e-2)
  scores = score_attention(blank_image_attention(model, jitted)[0], model.grid, 3)
  assert [h.offset for h in scores] == [h.offset for h in block0("impulse3")]


@pytest.mark.parametrize("kind", ["impulse3", "impulse5_closed"])
def test_six_heads_vit_s(kind):
  model = create_model("vit_s16", img_size=32, patch_size=4, depth=1, num_classes=10,
                       pool="gap", posemb="sincos2d", attention_init=kind)
  scores = score_model(model, window=si.window(kind))[0]
  assert len(scores) == 6
  for h in scores:
    assert h.argmax_fraction >= 0.8 and h.mass >= 0.06, h


@pytest.mark.parametrize("kind", ["impulse3", "impulse3_closed"])
def test_learned_position_embedding_uses_its_initial_value(kind):
  # A learned encoding starts random; the fit goes through its initial value.
  model = create_model("vit_ti16", img_size=32, patch_size=4, depth=1, num_heads=4,
                       pool="gap", posemb="learn", attention_init=kind)
  for h in score_model(model, window=3)[0]:
    assert h.argmax_fraction >= 0.8 and h.mass >= 0.06, h


@pytest.mark.parametrize("style,stem,name", [("jax", "patchify", "vit_ti2_32"),
                                             ("pycls", "patchify", "vit_ti2_32"),
                                             ("pycls", "conv_1gf", "vitc_1gf"),
                                             ("jax", "srelu", "vit_ti16_srelu")])
def test_blank_image_tokens_are_the_position_encoding(style, stem, name):
  model = create_model(name, img_size=64, patch_size=16 if name != "vit_ti2_32" else 2,
                       depth=1, pool="gap", posemb="sincos2d", init_style=style, stem=stem)
  variables = model.init(jax.random.PRNGKey(0), blank(model, 2))
  for train in (False, True):
    _, out = model.apply(variables, blank(model, 2), train=train, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(out["tokens"][0], sincos2d(model.grid, model.width),
                               atol=1e-6)


def test_clear_errors():
  with pytest.raises(ValueError, match="class token.*pool='gap'"):
    create_model("vit_ti16", attention_init="impulse3")
  with pytest.raises(ValueError, match="position encoding"):
    create_model("vit_ti2_32", posemb="none", attention_init="impulse3_closed")
  with pytest.raises(ValueError, match="grid of at least 5x5, got 4x4"):
    create_model("vit_ti2_32", img_size=8, attention_init="impulse5")
  create_model("vit_ti2_32", img_size=8, attention_init="impulse3")  # 4x4 fits 3x3
  with pytest.raises(ValueError, match="attention_init 'impulse7'"):
    create_model("vit_ti2_32", attention_init="impulse7")
  # Mimetic needs no position encoding and works with a class token.
  create_model("vit_ti16", attention_init="mimetic")
  with pytest.raises(ValueError, match="interior queries"):
    score_attention(np.zeros((1, 1, 16, 16)), 4, 5)


def test_default_is_unchanged_by_the_knob():
  a = ti_init("default")[1]
  model = create_model("vit_ti2_32", capture_attention=True)
  b = model.init(jax.random.PRNGKey(0), blank(model))
  jax.tree.map(np.testing.assert_array_equal, a, b)
