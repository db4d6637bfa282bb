"""The config contract: the base config every experiment in configs/ extends.

Each field of `base_config()` is read by the trainer (train.py, optim.py, evaluate.py);
an experiment file (configs/<name>.py) builds on it with `get_config(arg)`. Durations
come as steps or epochs; `total_steps` wins when set, so `--config.total_steps=N` always
works.
"""

import ml_collections


def parse_arg(arg, **defaults):
  """'variant=B/16,runlocal' -> ConfigDict(variant='B/16', runlocal=True) over defaults.

  A bare name sets a boolean; values are cast to the default's type.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"Unknown config argument '{key}'; valid: {', '.join(defaults)}.")
    if not eq:
      out[key] = True
    elif isinstance(defaults[key], bool):
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = type(defaults[key])(value) if defaults[key] is not None else value
  return out


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
      scan_blocks=False))       # nn.scan over the blocks (another parameter layout)
  # Data.
  c.dataset = "imagenet2012"
  c.data_dir = ""                 # '' = $TFDS_DATA_DIR or tfds' default
  c.train_split = "train"
  c.eval_splits = ("validation",)
  c.num_classes = 1000
  c.image_size = 224
  c.pp_train = ""                 # preprocessing ops "decode|inception_crop(224)|..."
  c.pp_eval = ""                  # ('' = the defaults of convstem_jax/data/files.py)
  c.data_threads = 0              # tf.data private threads (0 = TensorFlow's choice)
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
  c.checkpoint_every_steps = 1000
  c.checkpoint_every_epochs = 0.0
  c.max_to_keep = 3
  # Optimisation.
  c.optimizer = "adamw"           # adamw | sgd | lamb
  c.optimizer_kw = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8))
  c.lr = 5e-4
  c.lr_batch_base = 512           # lr scales with batch_size / lr_batch_base (0 = off)
  c.schedule = ml_collections.ConfigDict(dict(
      warmup_steps=0, warmup_epochs=5.0, warmup_init=0.0, decay="cosine",
      end_factor=0.0, end_lr=0.0, per_epoch=False))
  c.weight_decay = 0.05
  c.mu_dtype = ml_collections.config_dict.placeholder(str)  # e.g. 'bfloat16': Adam's
                                  # first moment / SGD momentum (None = params' dtype)
  c.wd_posemb = False             # decay the position embedding / class token?
  c.wd_cls = False
  c.grad_clip_norm = 0.0
  c.grad_accum_steps = 1          # micro-batches per step (same global batch)
  c.label_smoothing = 0.1
  # Mixup / CutMix, on device in the train step (convstem_jax/data/mixup.py, timm's
  # Mixup(mode='batch')): one draw per global batch, mixed with the reversed batch.
  # Both 0 = off. DeiT and the conv-stem paper: mixup 0.8, CutMix 1.0, switch 0.5.
  c.mixup_alpha = 0.0             # Beta(a, a) for mixup's lam (0 = no mixup)
  c.cutmix_alpha = 0.0            # Beta(a, a) for CutMix's lam (0 = no CutMix)
  c.mixup_switch_prob = 0.5       # both on: chance a batch uses CutMix instead of mixup
  c.mixup_prob = 1.0              # chance a batch is mixed at all
  c.ema_decay = 0.0               # 0 = no EMA weights
  c.precise_bn_images = 0         # recompute BN statistics on N train images before eval
  # Where it runs.
  c.mesh = (("data", -1),)
  c.fsdp = False
  c.init_from = ""                # another run's workdir or checkpoint path
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
  c.total_steps = 50
  c.log_every_steps = 10
  c.eval_every_steps = 0
  c.eval_every_epochs = 0.0
  c.checkpoint_every_steps = 25
  c.schedule.warmup_steps = 5
  c.model.depth = 2
  return c
