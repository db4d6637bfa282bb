"""Weights with PyTorch: timm loads our exports and computes our logits; pycls and timm
checkpoints import; a file that needs unpickling code is refused.

Needs PyTorch and timm (`pip install -e ".[parity]"`); see test_parity.py for the
torchvision stand-in.
"""

import argparse
import functools
import importlib.util

import numpy as np
import pytest

from stub_util import ensure_importable

torch = pytest.importorskip(
    "torch", reason='these tests need PyTorch (CPU is enough): pip install -e ".[parity]"')
if importlib.util.find_spec("timm") is None:
  pytest.importorskip("timm", reason='these tests need timm: pip install -e ".[parity]"')
ensure_importable("torchvision")
import timm  # noqa: E402,F401

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from convstem_jax import errors  # noqa: E402
from convstem_jax.models import ViT, create_model  # noqa: E402
from convstem_jax.weights import big_vision, core, files, load  # noqa: E402
from convstem_jax.weights import timm as timm_names  # noqa: E402

TOL = 1e-5
MODELS = {
    "conv": lambda: create_model("vitc_1gf", depth=2, img_size=32, num_classes=5),
    "patchify": lambda: create_model("vit_ti16", depth=2, img_size=32, num_classes=5),
    "srelu": lambda: create_model("vit_ti16_srelu", depth=2, img_size=32, num_classes=5),
    "srelu_ln": lambda: create_model("vit_ti16", stem="srelu_ln", depth=1, img_size=32,
                                     num_classes=5),
    "gap_sincos": lambda: ViT(img_size=16, patch_size=4, width=32, depth=2, num_heads=2,
                              mlp_dim=64, num_classes=3, pool="gap", posemb="sincos2d"),
    "ablation_s2": lambda: create_model("vitc_4gf_s2", depth=1, img_size=32, num_classes=5),
}


def trained_like(model, seed=0):
  """The model's init with every constant (biases, norms, class token, head, BN
  statistics) randomised, so each tensor moves the logits."""
  x = jnp.zeros((1, model.img_size, model.img_size, 3))
  flat = core.flatten(jax.device_get(model.init(jax.random.PRNGKey(seed), x)))
  rng = np.random.default_rng(seed)
  for name, v in flat.items():
    noise = rng.normal(size=v.shape).astype(np.float32)
    if name.endswith("/var"):
      flat[name] = np.abs(noise) * 0.5 + 0.5
    elif name.endswith(("/bias", "/mean")) or "head" in name or name.endswith(
        ("cls", "pos_embedding")):
      flat[name] = 0.1 * noise
    elif name.endswith("/scale"):
      flat[name] = 1 + 0.1 * noise
  return flat


def ours_logits(model, flat, x_nchw):
  with jax.default_matmul_precision("highest"):
    logits, _ = model.apply(core.unflatten(flat), jnp.asarray(x_nchw.permute(0, 2, 3, 1)
                                                              .numpy()), train=False)
  return np.asarray(logits)


@pytest.mark.parametrize("name", list(MODELS))
def test_timm_builds_our_export_strictly_and_gives_our_logits(name, tmp_path):
  from safetensors.numpy import save
  model = MODELS[name]()
  flat = trained_like(model)
  state, code = timm_names.to_timm(flat, model)
  path = tmp_path / "w.safetensors"
  path.write_bytes(save(state))
  scope = {}
  exec(code.replace("PATH", repr(str(path))), scope)  # the printed recipe, as a user runs it
  tm = scope["model"].eval()
  x = torch.randn(2, 3, model.img_size, model.img_size,
                  generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    want = tm(x).numpy()
  got = ours_logits(model, flat, x)
  assert np.abs(want).max() > 0.1  # not vacuous
  err = float(np.abs(got - want).max())
  print(f"{name}: max abs logit error {err:.2e}")
  assert err <= TOL


def test_timm_npz_loader_reads_our_big_vision_export(tmp_path):
  """timm's own `load_pretrained` (big_vision branch) on our npz, with the big_vision
  convention no_embed_class=True: the same logits."""
  model = MODELS["patchify"]()
  flat = trained_like(model, seed=2)
  path = tmp_path / "w.npz"
  np.savez(path, **big_vision.to_npz(flat, model))
  tm = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
                         num_classes=5, no_embed_class=True)
  tm.load_pretrained(str(path))
  tm.eval()
  x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    want = tm(x).numpy()
  err = float(np.abs(ours_logits(model, flat, x) - want).max())
  print(f"timm npz loader: max abs logit error {err:.2e}")
  assert err <= TOL


# --- pycls ---------------------------------------------------------------------------

class _Module(torch.nn.Module):
  pass


class PyclsViT(torch.nn.Module):
  """pycls/models/vit.py's module names and forward (conv stem, class token), written
  out here: pycls itself needs its global config. LayerNorm eps 1e-5 (cfg.LN.EPS)."""

  def __init__(self, ks, ws, ss, depth, heads, mlp, classes, img):
    super().__init__()
    nn = torch.nn
    self.stem, w_in = _Module(), 3
    for i, (k, w, s) in enumerate(zip(ks, ws, ss)):
      if i < len(ks) - 1:
        self.stem.add_module(f"cstem{i}_conv", nn.Conv2d(w_in, w, 3, s, 1, bias=False))
        self.stem.add_module(f"cstem{i}_bn", nn.BatchNorm2d(w, eps=1e-5))
        self.stem.add_module(f"cstem{i}_af", nn.ReLU())
      else:
        self.stem.add_module("cstem_last_conv", nn.Conv2d(w_in, w, k, s, (k - 1) // 2))
      w_in = w
    d = ws[-1]
    seq = (img // int(np.prod(ss))) ** 2 + 1
    self.class_token = nn.Parameter(torch.zeros(1, 1, d))
    self.pos_embedding = nn.Parameter(torch.zeros(seq, 1, d))
    self.encoder = _Module()
    for i in range(depth):
      b = _Module()
      b.ln_1 = nn.LayerNorm(d, eps=1e-5)
      b.self_attention = _Module()
      b.self_attention.block = nn.MultiheadAttention(d, heads, batch_first=False)
      b.ln_2 = nn.LayerNorm(d, eps=1e-5)
      b.mlp_block = _Module()
      b.mlp_block.linear_1, b.mlp_block.af = nn.Linear(d, mlp), nn.GELU()
      b.mlp_block.linear_2 = nn.Linear(mlp, d)
      self.encoder.add_module(f"block_{i}", b)
    self.encoder.ln = nn.LayerNorm(d, eps=1e-5)
    self.head = _Module()
    self.head.head_fc = nn.Linear(d, classes)

  def forward(self, x):
    for layer in self.stem.children():
      x = layer(x)
    x = x.reshape(x.size(0), x.size(1), -1).permute(2, 0, 1)  # (tokens, n, d)
    x = torch.cat([self.class_token.expand(-1, x.size(1), -1), x], dim=0)
    x = x + self.pos_embedding
    for name, b in self.encoder.named_children():
      if name == "ln":
        x = b(x)
        continue
      y = b.ln_1(x)
      x = x + b.self_attention.block(y, y, y, need_weights=False)[0]
      x = x + b.mlp_block.linear_2(b.mlp_block.af(b.mlp_block.linear_1(b.ln_2(x))))
    return self.head.head_fc(x[0])


def _pycls_pair(seed):
  gen = torch.Generator().manual_seed(seed)
  ref = PyclsViT((3, 3, 3, 3, 1), (24, 48, 96, 192, 192), (2, 2, 2, 2, 1), depth=2,
                 heads=3, mlp=576, classes=5, img=32)
  with torch.no_grad():
    for p in ref.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if p.ndim == 1 else 0.2))
    for m in ref.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
  return ref.eval()


def test_pycls_checkpoint_imports_and_gives_pycls_logits(tmp_path):
  ref, ema = _pycls_pair(0), _pycls_pair(1)
  names = set(ref.state_dict())
  assert {"stem.cstem0_conv.weight", "stem.cstem_last_conv.bias", "pos_embedding",
          "encoder.block_1.self_attention.block.in_proj_weight",
          "encoder.block_0.mlp_block.linear_2.bias", "encoder.ln.weight",
          "head.head_fc.weight"} <= names
  path = tmp_path / "model_epoch_0100.pyth"  # pycls's checkpoint layout
  torch.save({"epoch": 99, "test_err": 20.0, "ema_err": 19.5,
              "model_state": ref.state_dict(), "ema_state": ema.state_dict(),
              "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.1}]},
              "cfg": "VIT:\n  PATCH_SIZE: 16\n"}, path)
  model = create_model("vitc_1gf", depth=2, img_size=32, num_classes=5,
                       layer_norm_eps=1e-5)
  x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
  for net, use_ema in ((ref, False), (ema, True)):
    flat = load.import_weights(str(path), model, ema=use_ema)
    with torch.no_grad():
      want = net(x).numpy()
    err = float(np.abs(ours_logits(model, flat, x) - want).max())
    print(f"pycls (ema={use_ema}): max abs logit error {err:.2e}")
    assert np.abs(want).max() > 0.1 and err <= TOL


def test_timm_training_checkpoint_and_its_ema(tmp_path):
  model = MODELS["patchify"]()
  a, b = trained_like(model, 3), trained_like(model, 4)
  sa, _ = timm_names.to_timm(a, model)
  sb, _ = timm_names.to_timm(b, model)
  t = lambda s: {"module." + k: torch.from_numpy(v) for k, v in s.items()}  # DDP names
  path = tmp_path / "checkpoint-10.pth.tar.pth"
  torch.save({"epoch": 10, "arch": "vit_tiny_patch16_224", "state_dict": t(sa),
              "state_dict_ema": t(sb), "version": 2}, path)
  got = load.import_weights(str(path), model)
  assert all(np.array_equal(got[k], a[k]) for k in a)
  got = load.import_weights(str(path), model, ema=True)
  assert all(np.array_equal(got[k], b[k]) for k in b)


def test_files_needing_code_to_unpickle_are_refused(tmp_path):
  model = MODELS["patchify"]()
  state, _ = timm_names.to_timm(trained_like(model), model)
  path = tmp_path / "timm_train.pth"
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in state.items()},
              "args": argparse.Namespace(lr=0.1)}, path)  # timm's train.py saves this
  with pytest.raises(errors.UserError, match="refused") as e:
    files.read(str(path))
  assert "state_dict" in str(e.value) and "\n" not in str(e.value)


def test_torch_files_without_torch_say_so(tmp_path, monkeypatch):
  path = tmp_path / "w.pth"
  path.write_bytes(b"not read")
  monkeypatch.setitem(__import__("sys").modules, "torch", None)
  with pytest.raises(errors.UserError, match="needs PyTorch"):
    files.read(str(path))
