r"""Step throughput and MFU of the real train (and eval) step, optionally against timm.

    python -m convstem_jax.tools.benchmark --model vit_b16 --batch_size 256 \
        --dtype bfloat16 [--attention_impl cudnn] [--remat dots] [--scan_blocks] \
        [--img_size 224] [--num_classes 1000] [--warmup 5] [--steps 30] [--eval] \
        [--peak_tflops 989] [--compare-timm [--torch_compile on|off|auto]] \
        [--override width=64,depth=2] [--set mu_dtype=bfloat16] [--profile 5]
        [--json out.json]

What it times: `train.make_train_step` jitted by `train.jit_train_step`, i.e. the step
the trainer runs (donated state, batch split over every device, AdamW, label smoothing,
metrics), on one synthetic batch that lives on the devices, so no input pipeline is in
the loop. It compiles ahead of time (the compile time is reported on its own), runs
`--warmup` steps, then `--steps` timed steps; the host waits for the device only at the
two ends of the timed window. `--eval` does the same for the evaluator's step.

Figures:
  images/s     global batch x timed steps / timed seconds (all devices together)
  step         seconds per step
  compile      lower + compile of the step, seconds
  peak memory  the largest `peak_bytes_in_use` over local devices (whole process so
               far, so it includes the state); 'n/a' where the backend has no stats (CPU)
  MFU          model FLOP/s / peak FLOP/s of all devices, with model FLOPs from the
               analytic multiply-adds (models/complexity.py): 2 FLOPs per multiply-add,
               x3 for a training step (forward + backward), x1 for eval. See `mfu`.

`--profile N` traces N more train steps with jax.profiler and prints where the time goes:
milliseconds per step by part (stem, blocks, the rest) and the top ops, each named after
the JAX op it came from, forward or backward (`profile_ops`).

`--compare-timm` builds timm's VisionTransformer for the same architecture (the named
timm model for ViT-Ti/S/B/L; timm blocks with this model's conv / scaled-ReLU stem as a
torch `HybridEmbed` backbone otherwise) and times its train step in PyTorch: bf16
autocast when --dtype=bfloat16, channels-last, AdamW (fused on CUDA), torch.compile on
CUDA (`--torch_compile`), same batch and label smoothing. It runs before any JAX work,
then frees its memory, so JAX's preallocation still finds the GPU empty.
Importing this module does not import TensorFlow or torch.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import json
import re
import time
from typing import Any, Callable

import numpy as np

# --------------------------------------------------------------------------- peak FLOPs
# Dense (no sparsity) peak TFLOP/s per JAX device, looked up by a substring of
# `device.device_kind` (lower case, first match wins, so specific names come first).
# Sources, as published by the vendors (no measurement here):
#  - NVIDIA H100 SXM5 datasheet: BF16 tensor 1,979 TFLOP/s *with sparsity* -> 989 dense;
#    FP32 (CUDA cores, not tensor) 67. H100 PCIe: 1,513 sparse -> 756 dense; FP32 51.
#  - NVIDIA H200 SXM datasheet: same compute as H100 SXM (989 / 67).
#  - NVIDIA A100 datasheet: BF16 312 dense; FP32 19.5.
#  - Google Cloud TPU system architecture pages, bf16 per chip: v2 45, v3 123, v4 275,
#    v5e 197, v5p 459, v6e (Trillium) 918. v2 and v3 chips show up as 2 JAX devices
#    (one per TensorCore), so their per-device figure is half the chip's; v4, v5p
#    (megacore), v5e and v6e are one device per chip.
# float32: on GPUs the FP32 figure is the non-tensor-core peak. XLA's default matmul
# precision may run float32 matmuls on TF32 tensor cores (H100 494 dense, A100 156),
# where MFU against the FP32 figure can exceed 100%: pass --peak_tflops to choose. TPUs
# run float32 matmuls as bf16 passes at default precision and publish no float32 peak,
# so it is left unknown (None -> MFU 'n/a' unless --peak_tflops).
PEAK_TFLOPS: tuple[tuple[str, str, dict[str, float | None]], ...] = (
    ("h100 pcie", "NVIDIA H100 PCIe", {"bfloat16": 756.0, "float32": 51.0}),
    ("h100", "NVIDIA H100 SXM", {"bfloat16": 989.0, "float32": 67.0}),
    ("h200", "NVIDIA H200", {"bfloat16": 989.0, "float32": 67.0}),
    ("a100", "NVIDIA A100", {"bfloat16": 312.0, "float32": 19.5}),
    ("tpu v6 lite", "TPU v6e", {"bfloat16": 918.0, "float32": None}),
    ("tpu v6e", "TPU v6e", {"bfloat16": 918.0, "float32": None}),
    ("tpu v5 lite", "TPU v5e", {"bfloat16": 197.0, "float32": None}),
    ("tpu v5e", "TPU v5e", {"bfloat16": 197.0, "float32": None}),
    ("tpu v5", "TPU v5p", {"bfloat16": 459.0, "float32": None}),  # v5p: "TPU v5(p)"
    ("tpu v4", "TPU v4", {"bfloat16": 275.0, "float32": None}),
    ("tpu v3", "TPU v3 (per core)", {"bfloat16": 123.0 / 2, "float32": None}),
    ("tpu v2", "TPU v2 (per core)", {"bfloat16": 45.0 / 2, "float32": None}),
)


def device_peak_tflops(device_kind: str, dtype: str) -> float | None:
  """Published dense peak TFLOP/s of one JAX device of `device_kind` at `dtype`, or
  None when unknown (e.g. CPU)."""
  kind = device_kind.lower()
  for key, _, peaks in PEAK_TFLOPS:
    if key in kind:
      return peaks.get(dtype)
  return None


def flops_per_image(macs_per_image: float, train: bool = True) -> float:
  """Model FLOPs for one image: 2 per multiply-add, x3 for forward + backward."""
  return 2.0 * macs_per_image * (3.0 if train else 1.0)


def mfu(macs_per_image: float, images_per_sec: float, peak_tflops: float | None,
        train: bool = True) -> float | None:
  """Model FLOPs utilisation: flops_per_image x images/s / (peak TFLOP/s x 1e12).

  `peak_tflops` is the peak of all devices together (per-device peak x device count);
  None (unknown device) gives None. E.g. vit_b16 at 224 px: 17.58 GMACs -> 105.5 GFLOP
  per training image; 4,700 images/s on one H100 (989) -> 0.50.
  """
  if not peak_tflops:
    return None
  return flops_per_image(macs_per_image, train) * images_per_sec / (peak_tflops * 1e12)


# ------------------------------------------------------------------------ JAX timing


@dataclasses.dataclass
class Timing:
  images_per_sec: float
  step_s: float
  compile_s: float
  peak_bytes: int | None
  mfu: float | None = None
  extra: dict = dataclasses.field(default_factory=dict)

  def line(self, what: str) -> str:
    mem = "n/a" if self.peak_bytes is None else f"{self.peak_bytes / 2**30:.2f} GiB"
    util = "n/a" if self.mfu is None else f"{100 * self.mfu:.3g}%"
    return (f"{what}: {self.images_per_sec:,.1f} images/s, step {1e3 * self.step_s:.2f} ms, "
            f"compile {self.compile_s:.1f} s, peak memory {mem}, MFU {util}")


def peak_device_bytes() -> int | None:
  import jax  # pylint: disable=g-import-not-at-top
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def _timed(compiled: Callable, args: tuple, carry: bool, warmup: int, steps: int
           ) -> tuple[float, list, Any]:
  """(seconds for `steps` calls after `warmup` calls, final args, last output); the host
  waits only at the window's ends. With `carry`, each call's first output replaces the
  first argument (the donated state)."""
  import jax  # pylint: disable=g-import-not-at-top
  args, out = list(args), None
  for n, timed in ((warmup, False), (steps, True)):
    jax.block_until_ready(args)
    t0 = time.perf_counter()
    for _ in range(n):
      out = compiled(*args)
      if carry:
        args[0] = out[0]
    jax.block_until_ready((args, out))
    if timed:
      return time.perf_counter() - t0, args, out
  raise AssertionError("unreachable")


def _op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the JAX op it came from (its `op_name` metadata)."""
  names = {}
  for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]+)"', hlo_text,
                       re.MULTILINE):
    names.setdefault(m[1], m[2])
  return names


def _op_label(op_name: str) -> tuple[str, str]:
  """('stem' | 'blocks' | 'other', 'fwd|bwd|step <module path>/<op>') with block
  indices folded together, e.g. ('blocks', 'bwd block_*/mlp/fc1/dot_general')."""
  # fwd / bwd inside the gradient; 'step' outside it (optimizer, metrics).
  direction = ("bwd" if "transpose(jvp(" in op_name else
               "fwd" if "jvp(" in op_name else "step")
  path = re.sub(r"^jit\([^)]*\)/", "", op_name)
  path = re.sub(r"transpose\(jvp\(\w+\)\)/|jvp\(\w+\)/", "", path)
  path = re.sub(r"block_\d+", "block_*", path)
  part = ("stem" if path.startswith("stem/") else
          "blocks" if path.startswith(("block_*/", "blocks/")) else "other")
  return part, f"{direction} {path}"


def profile_ops(compiled, args: tuple, steps: int) -> dict[str, float]:
  """Milliseconds per step of each op of the compiled train step, from a jax.profiler
  trace of `steps` calls: {'part: fwd|bwd|step op': ms}. Ops are the executed HLO
  instructions (fusions), named after the JAX op they came from."""
  import glob  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  names = _op_names(compiled.as_text())
  args = list(args)
  with tempfile.TemporaryDirectory() as tmp:
    jax.block_until_ready(args)
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    for _ in range(steps):
      args[0] = compiled(*args)[0]
    jax.block_until_ready(args)
    jax.profiler.stop_trace()
    (trace,) = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
    with gzip.open(trace) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  table: dict[str, float] = {}
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X" or "dur" not in e:
      continue
    if name in names:
      key = ": ".join(_op_label(names[name]))
    elif re.fullmatch(r"[a-z][\w\-]*\.\d+", name):  # an HLO instruction without a source
      key = f"other: step {name.rsplit('.', 1)[0]} (no JAX op)"
    else:
      continue  # runtime and Python frames, not ops
    table[key] = table.get(key, 0.0) + e["dur"] / 1e3 / steps
  return table


def print_profile(profile: dict[str, float], step_s: float, top: int = 25) -> None:
  """Prints `profile_ops`'s table: the parts, then the top ops."""
  table = {tuple(k.split(": ", 1)): ms for k, ms in profile.items()}
  total = sum(table.values())
  parts: dict[str, float] = {}
  for (part, _), ms in table.items():
    parts[part] = parts.get(part, 0.0) + ms
  print(f"profile: {total:.1f} ms of ops per step ({1e3 * step_s:.1f} ms wall; ops on "
        "several threads add up): " + ", ".join(
            f"{p} {ms:.1f} ms ({100 * ms / total:.0f}%)" for p, ms in
            sorted(parts.items(), key=lambda kv: -kv[1])))
  for (part, op), ms in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
    print(f"  {ms:8.2f} ms  {100 * ms / total:4.1f}%  {part:6s} {op}")


def benchmark_config(model_name: str, batch_size: int, num_classes: int, img_size: int,
                     model_overrides: dict, config_overrides: dict):
  """The trainer config the benchmark step is built from: the base config (AdamW, label
  smoothing 0.1, no mixup, no EMA) with the benchmark's model and batch."""
  from convstem_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.model_name, c.batch_size, c.eval_batch_size = model_name, batch_size, batch_size
  c.num_classes, c.image_size = num_classes, img_size
  c.total_steps = 1000
  for k, v in model_overrides.items():
    c.model[k] = v
  for k, v in config_overrides.items():
    if k not in c:
      print(f"note: '{k}' is not a field of the base config; check its spelling.")
    c[k] = v
  return c


def time_jax(config, warmup: int, steps: int, eval_too: bool, peak_tflops: float | None,
             macs: float, profile: int = 0) -> dict[str, Timing]:
  """Times the trainer's jitted train step (and the evaluator's step) on `config`; with
  `profile` > 0 also the train step's ops over that many steps (extra['profile'])."""
  import jax  # pylint: disable=g-import-not-at-top
  from convstem_jax import evaluate as eval_lib  # pylint: disable=g-import-not-at-top
  from convstem_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  from convstem_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  from convstem_jax.models import model_from_config  # pylint: disable=g-import-not-at-top

  model = model_from_config(config)
  mesh = shd.make_mesh(config.mesh)
  local_bs = shd.local_batch_size(config.batch_size)
  plan = train_lib.plan_state(config, model, mesh, config.total_steps, config.total_steps)
  state = jax.jit(plan.init_state, out_shardings=plan.state_sharding)(
      jax.random.PRNGKey(config.seed))

  # One synthetic batch, resident on the devices for the whole run.
  host = np.random.default_rng(0)
  local = {"image": host.standard_normal((local_bs, model.img_size, model.img_size, 3),
                                         np.float32),
           "label": host.integers(0, model.num_classes, local_bs).astype(np.int32)}
  batch = shd.global_batch(local, mesh)

  step = train_lib.jit_train_step(train_lib.make_train_step(config, model, plan),
                                  plan.state_sharding, mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  seconds, (state, _), (_, metrics) = _timed(compiled, (state, batch), True, warmup, steps)
  ips = config.batch_size * steps / seconds
  results = {"train": Timing(ips, seconds / steps, compile_s, peak_device_bytes(),
                             mfu(macs, ips, peak_tflops, train=True),
                             {"loss": float(metrics["train/loss"])})}
  if profile:
    results["train"].extra["profile"] = profile_ops(compiled, (state, batch), profile)
  if eval_too:
    eval_batch = {**batch, "mask": shd.global_batch(
        {"mask": np.ones(local_bs, np.float32)}, mesh)["mask"]}
    eval_step = jax.jit(eval_lib.make_eval_step(model), out_shardings=shd.replicated(mesh))
    t0 = time.perf_counter()
    compiled = eval_step.lower(state.params, state.batch_stats, eval_batch).compile()
    compile_s = time.perf_counter() - t0
    seconds, _, _ = _timed(compiled, (state.params, state.batch_stats, eval_batch), False,
                           warmup, steps)
    ips = config.batch_size * steps / seconds
    results["eval"] = Timing(ips, seconds / steps, compile_s, peak_device_bytes(),
                             mfu(macs, ips, peak_tflops, train=False))
  return results


# ----------------------------------------------------------------------- timm / torch

# Our patchify sizes that are timm's named models (patch 16, 224 px, class token).
TIMM_NAMES = {(192, 12, 3, 768): "vit_tiny_patch16_224",
              (384, 12, 6, 1536): "vit_small_patch16_224",
              (768, 12, 12, 3072): "vit_base_patch16_224",
              (1024, 24, 16, 4096): "vit_large_patch16_224"}


class TimmUnsupported(ValueError):
  pass


def _import_timm():
  try:
    import timm  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except Exception as e:  # noqa: BLE001 - torchvision import failures surface here too
    raise TimmUnsupported(f"--compare-timm needs PyTorch and timm importable ({e}); "
                          "install them with pip install -e '.[parity]'.") from e
  return torch, timm


def build_timm(model) -> tuple[Any, str]:
  """(timm model, description) with the architecture of our `model` (a ViT)."""
  torch, timm = _import_timm()
  from timm.layers import HybridEmbed  # pylint: disable=g-import-not-at-top
  from timm.models import vision_transformer as timm_vit  # pylint: disable=g-import-not-at-top
  spec = model.stem_spec()
  token = model.pool == "token"
  notes = []
  if model.posemb == "sincos2d":
    notes.append("learned position embedding in place of the fixed sin-cos one")
  kw = dict(img_size=model.img_size, num_classes=model.num_classes, embed_dim=model.width,
            depth=model.depth, num_heads=model.num_heads,
            mlp_ratio=model.mlp_dim / model.width, qkv_bias=model.qkv_bias,
            class_token=token, global_pool="token" if token else "avg",
            pos_embed="none" if model.posemb == "none" else "learn",
            drop_rate=model.dropout, attn_drop_rate=model.attention_dropout,
            drop_path_rate=model.drop_path)
  if not spec.layers:
    name = TIMM_NAMES.get((model.width, model.depth, model.num_heads, model.mlp_dim))
    if (name and model.patch_size == 16 and model.img_size == 224 and token
        and model.posemb == "learn" and model.qkv_bias):
      net = timm.create_model(name, pretrained=False, num_classes=model.num_classes,
                              drop_rate=model.dropout, drop_path_rate=model.drop_path)
      return net, f"timm {name}"
    net = timm_vit.VisionTransformer(patch_size=model.patch_size, **kw)
    desc = "timm VisionTransformer (same sizes)"
  else:
    if spec.proj_kernel != spec.proj_stride or spec.projection.pad:
      raise TimmUnsupported(f"--compare-timm cannot express this stem's projection "
                            f"({spec.proj_kernel}x{spec.proj_kernel}/{spec.proj_stride}) "
                            "with timm's HybridEmbed; benchmark without it.")
    layers, c_in = [], 3
    for l in spec.layers:
      layers.append(torch.nn.Conv2d(c_in, l.channels, l.kernel, l.stride, l.pad,
                                    bias=l.bias))
      if l.norm == "batch":
        layers.append(torch.nn.BatchNorm2d(l.channels))
      elif l.norm == "layer":
        from timm.layers import LayerNorm2d  # pylint: disable=g-import-not-at-top
        layers.append(LayerNorm2d(l.channels, eps=1e-6))
      if l.act != "none":
        layers.append(torch.nn.ReLU() if l.act == "relu" else torch.nn.GELU())
      c_in = l.channels
    if not spec.proj_bias:
      notes.append("biased projection (timm's HybridEmbed) where ours has none")
    net = timm_vit.VisionTransformer(
        patch_size=spec.proj_kernel,
        embed_layer=functools.partial(HybridEmbed, backbone=torch.nn.Sequential(*layers)),
        **kw)
    desc = "timm VisionTransformer + this stem as a HybridEmbed backbone"
  return net, desc + (f" ({'; '.join(notes)})" if notes else "")


def time_timm(model, batch_size: int, dtype: str, warmup: int, steps: int,
              compile_mode: str = "auto", peak_tflops: float | None = None,
              macs: float = 0.0, label_smoothing: float = 0.1) -> tuple[Timing, str]:
  """timm's train step for `model`'s architecture in PyTorch on this machine."""
  torch, _ = _import_timm()
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  net, desc = build_timm(model)
  net = net.to(device).to(memory_format=torch.channels_last).train()
  use_compile = compile_mode == "on" or (compile_mode == "auto" and device.type == "cuda")
  torch.backends.cuda.matmul.allow_tf32 = True  # as XLA's default float32 matmuls
  torch.backends.cudnn.allow_tf32 = True
  opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05,
                          fused=device.type == "cuda")
  fwd = torch.compile(net) if use_compile else net
  gen = torch.Generator(device=device).manual_seed(0)
  x = torch.randn(batch_size, 3, model.img_size, model.img_size, device=device,
                  generator=gen).contiguous(memory_format=torch.channels_last)
  y = torch.randint(0, model.num_classes, (batch_size,), device=device, generator=gen)
  use_amp = dtype == "bfloat16"
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

  def step():
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
      loss = torch.nn.functional.cross_entropy(fwd(x), y, label_smoothing=label_smoothing)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  loss = step()  # the first step carries torch.compile's compilation
  sync()
  first_s = time.perf_counter() - t0
  for _ in range(max(warmup - 1, 0)):
    loss = step()
  sync()
  t0 = time.perf_counter()
  for _ in range(steps):
    loss = step()
  sync()
  seconds = time.perf_counter() - t0
  ips = batch_size * steps / seconds
  peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
  timing = Timing(ips, seconds / steps, first_s, peak, mfu(macs, ips, peak_tflops),
                  {"loss": float(loss.detach()), "device": str(device), "compiled": use_compile})
  del net, fwd, opt, x, y
  if device.type == "cuda":
    torch.cuda.empty_cache()
  return timing, (f"{desc}, torch {torch.__version__} on {device}, "
                  f"{'bf16 autocast' if use_amp else 'float32'}, channels-last, AdamW, "
                  f"torch.compile {'on' if use_compile else 'off'}")


# ------------------------------------------------------------------------------ CLI


def _parse_kv(items: list[str] | None) -> dict[str, Any]:
  """['a=1,b=x', 'c=True'] -> {'a': 1, 'b': 'x', 'c': True} (Python literals, else str)."""
  out = {}
  for item in items or []:
    for pair in filter(None, item.split(",")):
      key, eq, value = pair.partition("=")
      if not eq:
        raise ValueError(f"Expected KEY=VALUE, got '{pair}'.")
      try:
        out[key.strip()] = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        out[key.strip()] = value
  return out


def parse_args(argv=None) -> argparse.Namespace:
  from convstem_jax.models import vit  # pylint: disable=g-import-not-at-top
  from convstem_jax.models.variants import model_names  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="vit_b16", choices=model_names(), metavar="NAME",
                 help="a name from convstem_jax.models.model_names()")
  p.add_argument("--batch_size", type=int, default=256, help="global batch size")
  p.add_argument("--dtype", default="bfloat16", choices=tuple(vit.DTYPES),
                 help="compute dtype (parameters and optimizer state stay float32)")
  p.add_argument("--attention_impl", default="xla", choices=vit.ATTENTION_IMPLS)
  p.add_argument("--remat", default="none", choices=tuple(vit.REMAT_POLICIES))
  p.add_argument("--scan_blocks", action="store_true", help="nn.scan over the blocks")
  p.add_argument("--img_size", type=int, default=None, help="default: the model's own")
  p.add_argument("--num_classes", type=int, default=1000)
  p.add_argument("--mu_dtype", default=None, choices=("float32", "bfloat16"),
                 help="dtype of Adam's first moment (default: the params' float32)")
  p.add_argument("--warmup", type=int, default=5, help="untimed steps after compiling")
  p.add_argument("--steps", type=int, default=30, help="timed steps")
  p.add_argument("--eval", action="store_true", help="also time the eval step")
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="peak TFLOP/s per device (default: the table for the device kind)")
  p.add_argument("--override", action="append", metavar="K=V[,K=V]",
                 help="more ViT field overrides, e.g. depth=2,width=64")
  p.add_argument("--set", action="append", metavar="K=V[,K=V]",
                 help="trainer config fields, e.g. fsdp=True,grad_accum_steps=2")
  p.add_argument("--compare-timm", "--compare_timm", dest="compare_timm",
                 action="store_true", help="also time timm's model in PyTorch")
  p.add_argument("--torch_compile", default="auto", choices=("auto", "on", "off"),
                 help="torch.compile for --compare-timm (auto: on for CUDA only)")
  p.add_argument("--profile", type=int, default=0, metavar="N",
                 help="also trace N train steps and print where the time goes, by op")
  p.add_argument("--json", default="", help="also write the figures to this JSON file")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.steps < 1 or args.warmup < 0:
    raise SystemExit("--steps must be at least 1 and --warmup at least 0.")
  from convstem_jax.models import complexity  # pylint: disable=g-import-not-at-top
  from convstem_jax.models.variants import create_model  # pylint: disable=g-import-not-at-top

  overrides = dict(dtype=args.dtype, attention_impl=args.attention_impl, remat=args.remat,
                   scan_blocks=args.scan_blocks, **_parse_kv(args.override))
  img_size = args.img_size or create_model(args.model).img_size
  config_overrides = _parse_kv(args.set)
  if args.mu_dtype:
    config_overrides["mu_dtype"] = args.mu_dtype
  config = benchmark_config(args.model, args.batch_size, args.num_classes, img_size,
                            overrides, config_overrides)
  # As the trainer: on a CPU host one JAX device per core (--set cpu_devices=1: one).
  from convstem_jax import sharding  # pylint: disable=g-import-not-at-top
  sharding.configure_cpu_devices(config)
  model = create_model(args.model, num_classes=args.num_classes, img_size=img_size,
                       **overrides)
  _, macs = complexity.analytic(model)

  # timm first: no JAX device work has happened yet, so JAX can still preallocate.
  timm_result = None
  if args.compare_timm:
    timm_result = time_timm(model, args.batch_size, args.dtype, args.warmup, args.steps,
                            args.torch_compile, macs=macs)

  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  kind = devices[0].device_kind
  per_device = args.peak_tflops or device_peak_tflops(kind, args.dtype)
  peak = per_device * len(devices) if per_device else None
  print(f"{args.model}: {model.width}w x {model.depth} blocks, {model.img_size} px, "
        f"{macs / 1e9:.4g} GMACs/image ({flops_per_image(macs) / 1e9:.4g} GFLOP per "
        f"training image); global batch {args.batch_size}, {args.dtype}, attention "
        f"{args.attention_impl}, remat {args.remat}, scan_blocks {args.scan_blocks}"
        + (f", config {config_overrides}" if config_overrides else ""))
  print(f"devices: {len(devices)} x {kind} ({devices[0].platform}); peak "
        + (f"{per_device:g} TFLOP/s per device"
           + (" (--peak_tflops)" if args.peak_tflops else " (table)")
           if per_device else "unknown, MFU n/a (pass --peak_tflops)"))
  results = time_jax(config, args.warmup, args.steps, args.eval, peak, macs, args.profile)
  for what, t in results.items():
    print(t.line(f"jax {what}"))
  if args.profile:
    print_profile(results["train"].extra["profile"], results["train"].step_s)
  record = {"model": args.model, "batch_size": args.batch_size, "dtype": args.dtype,
            "attention_impl": args.attention_impl, "remat": args.remat,
            "scan_blocks": args.scan_blocks, "img_size": model.img_size,
            "device_kind": kind, "devices": len(devices), "macs_per_image": macs,
            "peak_tflops_per_device": per_device,
            **{what: dataclasses.asdict(t) for what, t in results.items()}}
  if timm_result:
    t, desc = timm_result
    if peak:
      t.mfu = mfu(macs, t.images_per_sec, peak)
    print(f"timm: {desc}")
    print(t.line("timm train").replace("compile", "first step (compile)"))
    ratio = results["train"].images_per_sec / t.images_per_sec
    print(f"jax / timm train images/s: {ratio:.2f}")
    record["timm"] = {**dataclasses.asdict(t), "description": desc, "ratio": ratio}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(record, f, indent=2)
  return record


if __name__ == "__main__":
  main()
