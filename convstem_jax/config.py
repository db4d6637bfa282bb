"""The config contract: the base config every experiment in configs/ extends.

Each field of `base_config()` is read by the trainer (train.py, optim.py, evaluate.py);
an experiment file (configs/<name>.py) builds on it with `get_config(arg)`. Each default
lives here and nowhere else: code that reads a field falls back to `default(name)`.

Durations and cadences come as a pair, `<name>_steps` or `<name>_epochs` (0 = unset /
never): `total`, `eval_every`, `checkpoint_every`, `ema_copy` and `schedule.warmup`.
Setting both of a pair is an error (`duration`), never a silent choice; on the command
line, giving one unit (`--config.checkpoint_every_epochs=1`) clears the other
(`main.py`), so an override always means what it says. Values derived from other
fields (steps per epoch, the EMA rate of a batch size, the preprocessing's image size)
are computed where the run starts, so they follow command-line overrides.
"""

import json

import ml_collections
from etils import epath

from convstem_jax import errors


def parse_arg(arg, **defaults):
  """'variant=B/16,runlocal' -> ConfigDict(variant='B/16', runlocal=True) over defaults.

  A bare name sets a boolean; values are cast to the default's type.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise errors.UserError(f"Unknown config argument '{key}'; valid: {', '.join(defaults)}.")
    if not eq:
      out[key] = True
    elif isinstance(defaults[key], bool):
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      try:
        out[key] = type(defaults[key])(value) if defaults[key] is not None else value
      except ValueError:
        raise errors.UserError(
            f"Config argument {key}={value} is not a valid {type(defaults[key]).__name__} "
            f"(default {defaults[key]!r}).") from None
  return out


# (container, name) of every steps/epochs pair; container '' is the config itself.
DURATIONS = (("", "total"), ("", "eval_every"), ("", "checkpoint_every"),
             ("", "ema_copy"), ("schedule", "warmup"))


def duration(node, name: str, steps_per_epoch: int, where: str = "") -> int:
  """`<name>_steps` or `<name>_epochs` of a config node, in steps (0 = unset / never).

  Epochs round to the nearest step, at least 1. Both set is a mistake, not a precedence.
  """
  steps = int(node.get(f"{name}_steps", 0) or 0)
  epochs = float(node.get(f"{name}_epochs", 0.0) or 0.0)
  prefix = f"{where}." if where else ""
  if steps < 0 or epochs < 0:
    raise errors.UserError(f"config.{prefix}{name}_steps / _epochs must not be negative "
                           f"(got {steps} / {epochs}).")
  if steps and epochs:
    raise errors.UserError(
        f"config.{prefix}{name}_steps={steps} and config.{prefix}{name}_epochs={epochs} "
        f"are both set; keep one and set the other to 0 (e.g. "
        f"--config.{prefix}{name}_epochs=0).")
  if steps:
    return steps
  return max(1, int(round(epochs * steps_per_epoch))) if epochs else 0


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run recorded in its workdir (config.json)."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise errors.MissingInputError(
        f"{path} is missing: the model is rebuilt from the config a training run writes "
        "into its workdir; pass the workdir of a run.")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def get(config, name: str, prefix: str = ""):
  """config.<name>, or the base config's default of `<prefix><name>` when the field is
  absent (a partial config) or an unset placeholder (None)."""
  value = config.get(name, None) if config is not None else None
  return default(prefix + name) if value is None else value


def default(name: str):
  """The base config's value of a field (for code given a partial config)."""
  node = base_config()
  for part in name.split("."):
    node = node[part]
  return node


def base_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Model: a name from convstem_jax.models.model_names() plus ViT field overrides.
  # Experiments add theirs with c.model.update(...); the run-time knobs below stay, so
  # --config.model.remat=full works on every config (a locked config rejects new keys).
  c.model_name = "vit_b16"
  c.model = ml_collections.ConfigDict(dict(
      dtype="float32",          # compute dtype; parameters stay float32
      attention_impl="xla",     # xla | cudnn (falls back to XLA) | auto
      remat="none",             # none | full | dots | dots_no_batch (models/vit.py)
      scan_blocks=False,        # nn.scan over the blocks (another parameter layout)
      stem_weight_grad="xla",   # xla | taps | im2col | auto: stem kernel gradients (stems.py)
      # Regularisation; None keeps the variant's own value (models/variants.py).
      dropout=ml_collections.config_dict.placeholder(float),
      attention_dropout=ml_collections.config_dict.placeholder(float),
      drop_path=ml_collections.config_dict.placeholder(float),
      # 1e-6 (timm, big_vision); 1e-5 to run pycls's (Xiao et al.'s) weights exactly.
      layer_norm_eps=ml_collections.config_dict.placeholder(float)))
  # Data.
  c.dataset = "imagenet2012"
  c.data_dir = ""                 # '' = $TFDS_DATA_DIR or tfds' default
  c.train_split = "train"
  c.eval_splits = ("validation",)
  c.num_classes = 1000
  c.image_size = 224
  c.pp_train = ""                 # preprocessing ops "decode|inception_crop(224)|..."
  c.pp_eval = ""                  # ('' = the defaults of convstem_jax/data/files.py)
  c.data_threads = 0              # tf.data threads and parallel calls (0 = the cores)
  c.data_autotune = False         # tf.data's autotuner (data/files.py says why it is off)
  c.data_workers = 0              # input worker processes, pinned one per core (data/
                                  # workers.py; file sources; -1 = one per core)
  c.shuffle_buffer = 50_000       # tfds shuffle buffer
  c.folder_test_fraction = 0.2    # dataset='folder' with a single tree: test share
  c.folder_split_seed = 0
  c.repeated_aug = 1              # DeiT repeated augmentation: each image r times per
                                  # epoch, differently augmented (1 = off)
  c.batch_size = 1024             # global, over all hosts and devices
  c.eval_batch_size = 1024
  # Duration and cadence (steps win over epochs; 0 = unset / never).
  c.total_steps = 0
  c.total_epochs = 300.0
  c.log_every_steps = 100
  c.eval_every_steps = 0
  c.eval_every_epochs = 10.0
  # At each eval, token / attention diagnostics of the first N eval images (0 = off):
  # scalars in metrics.jsonl / TensorBoard, JSON + attention maps in W/diagnostics/STEP.
  c.diagnostics_images = 0
  c.checkpoint_every_steps = 1000
  c.checkpoint_every_epochs = 0.0
  c.max_to_keep = 3
  # Optimisation.
  c.optimizer = "adamw"           # adamw | sgd | lamb
  c.optimizer_kw = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8))
  c.lr = 5e-4
  c.lr_batch_base = 512           # lr scales with batch_size / lr_batch_base (0 = off)
  c.schedule = ml_collections.ConfigDict(dict(
      warmup_steps=0, warmup_epochs=5.0,
      warmup_init=0.0,          # warmup starts at warmup_init x lr ...
      warmup_lr=ml_collections.config_dict.placeholder(float),  # ... unless this is set
      decay="cosine",
      end_factor=0.0,           # floor = end_factor x lr ...
      end_lr=ml_collections.config_dict.placeholder(float),  # ... unless end_lr is set
      per_epoch=False))
  c.weight_decay = 0.05
  c.mu_dtype = ml_collections.config_dict.placeholder(str)  # e.g. 'bfloat16': Adam's
                                  # first moment / SGD momentum (None = params' dtype)
  c.wd_posemb = False             # decay the position embedding / class token? (DeiT
  c.wd_cls = False                # and timm: no; pycls: yes)
  c.grad_clip_norm = 0.0
  c.grad_accum_steps = 1          # micro-batches per step (same global batch). Not neutral
                                  # for BatchNorm models: each micro-batch is normalised
                                  # with its own statistics (train.make_train_step)
  c.label_smoothing = 0.1
  # Mixup / CutMix, on device in the train step (convstem_jax/data/mixup.py, timm's
  # Mixup(mode='batch')): one draw per global batch, mixed with the reversed batch.
  # Both 0 = off. DeiT and the conv-stem paper: mixup 0.8, CutMix 1.0, switch 0.5.
  c.mixup_alpha = 0.0             # Beta(a, a) for mixup's lam (0 = no mixup)
  c.cutmix_alpha = 0.0            # Beta(a, a) for CutMix's lam (0 = no CutMix)
  c.mixup_switch_prob = 0.5       # both on: chance a batch uses CutMix instead of mixup
  c.mixup_prob = 1.0              # chance a batch is mixed at all
  # EMA weights (optim.ema_schedule). Either a fixed decay per step, or pycls's rate:
  # every ema_pycls_period steps mix in alpha = ema_pycls_alpha x batch_size / epochs x
  # period, as a per-step decay computed when the run starts (it follows batch_size).
  c.ema_decay = 0.0               # 0 = no EMA weights (unless ema_pycls_alpha is set)
  c.ema_pycls_alpha = 0.0         # pycls EMA_ALPHA (1e-5 in its ViT configs); 0 = off
  c.ema_pycls_period = 32         # pycls EMA_UPDATE_PERIOD
  c.ema_warmup = False            # decay min(decay, (1 + step) / (10 + step)) (timm, TF)
  c.ema_copy_steps = 0            # the EMA copies the model before this step (pycls: the
  c.ema_copy_epochs = 0.0         # warmup epochs); steps or epochs
  c.precise_bn_images = 0         # recompute BN statistics on N train images before eval
  # Where it runs.
  c.mesh = (("data", -1),)        # the only axis implemented; weights shard with fsdp
  c.fsdp = False
  # JAX devices on a CPU host (0 = one per core, lowered until the batches split evenly;
  # sharding.configure_cpu_devices says why). Single-process runs only; sizes only the
  # CPU backend, not a GPU or TPU; a count in XLA_FLAGS or JAX_NUM_CPU_DEVICES wins.
  c.cpu_devices = 0
  # Start from other weights (convstem_jax/weights): one of our workdirs or checkpoint
  # dirs, a big_vision / vit_jax .npz, a timm .safetensors / .pth, a pycls .pyth.
  # Loading is strict: every variable must be found at its shape, every weight used.
  c.init_from = ""
  c.init_from_ema = False         # take the source's EMA weights (ours, pycls, timm)
  # Regexes (full match) of names that start fresh: model variables as
  # 'params/head/kernel', or source keys to leave unused. A head whose class count
  # differs always starts fresh; a learned position embedding of another grid is
  # resampled (bilinear, class token kept apart).
  c.init_from_fresh = ()
  c.profile_steps = ()            # (first step, number of steps) to trace on host 0
  # Synthetic data (dataset='synthetic'): sizes of its splits and its noise.
  c.synthetic_train_examples = 50_000
  c.synthetic_eval_examples = 1_000
  c.synthetic_noise = 1.0
  return c


def apply_runlocal(c, *, image_size=32, batch_size=16):
  """Shrink a run to a laptop CPU (about a minute) on synthetic data."""
  c.dataset = "synthetic"
  c.eval_splits = ("test",)
  c.image_size = image_size
  c.num_classes = 10
  c.batch_size = c.eval_batch_size = batch_size
  c.synthetic_train_examples = 50 * batch_size
  c.synthetic_eval_examples = 100
  c.total_steps, c.total_epochs = 50, 0.0
  c.log_every_steps = 10
  c.eval_every_steps = 0
  c.eval_every_epochs = 0.0
  c.checkpoint_every_steps, c.checkpoint_every_epochs = 25, 0.0
  c.schedule.warmup_steps, c.schedule.warmup_epochs = 5, 0.0
  c.model.depth = 2
  return c
