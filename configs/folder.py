r"""A conv-stem ViT trained from scratch on your own image folder.

Command (CPU or one GPU; defaults suit ~10,000 small images, e.g. 28-64 px):
    python -m convstem_jax.main --config=configs/folder.py:data_dir=/path/to/root,image_size=32 \
        --workdir=workdirs/folder [--config.total_steps=600]
Layout (convstem_jax/data/folder.py): root/train/<class>/* and root/test/<class>/* (or
val/), or a single root/<class>/* tree of which a stratified 20% is held out for test.
Grayscale and RGB, jpg/png/gif/bmp/webp/tif; unreadable files are skipped with a warning,
other files ignored.
Arguments (comma list after ':'):
    data_dir=PATH   the root (required; the class count is read from it)
    image_size=N    images are resized to N x N (default 32; a multiple of 4)
    classes=N       class count, when the folder is not reachable from here
    depth=N         transformer blocks (default 6)
    flip            add random horizontal flips (off by default: wrong for digits/text)
    runlocal        2 blocks, 50 steps: checks the machinery in about a minute; on
                    synthetic data when no data_dir is given
Model: ViT-Ti width (192, 3 heads, MLP 576) with a small conv stem (3x3 stride-2 convs +
BatchNorm + ReLU, then a 1x1 projection) whose strides give a token grid of about 8x8.
Expected result: none measured yet beyond the tests; report yours.
"""

import math
import os

from convstem_jax import config as common


def conv_stem(image_size: int):
  """3x3/2 conv-BN-ReLU layers until the grid is about 8x8 (at least one layer)."""
  n = max(1, round(math.log2(max(image_size, 16) / 8)))
  channels = [min(192, 32 * 2 ** i) for i in range(n)]
  return [dict(kernel=3, stride=2, channels=ch) for ch in channels], 2 ** n


def get_config(arg=None):
  a = common.parse_arg(arg, data_dir="", image_size=32, classes=0, depth=6, flip=False,
                       runlocal=False)
  c = common.base_config()
  c.dataset = "folder"
  c.data_dir = a.data_dir
  c.train_split, c.eval_splits = "train", ("test",)
  if a.classes:
    c.num_classes = a.classes
  elif a.data_dir and os.path.isdir(a.data_dir):
    from convstem_jax.data.folder import count_classes  # pylint: disable=g-import-not-at-top
    c.num_classes = count_classes(a.data_dir)
  else:
    c.num_classes = 10  # the source says what is wrong with data_dir when it runs
  c.folder_test_fraction = 0.2
  c.folder_split_seed = 0
  size = a.image_size
  c.image_size = size
  stem, patch = conv_stem(size)
  c.model_name = "vitc_1gf"
  c.model.update(stem=stem, patch_size=patch, depth=a.depth, dtype="float32")
  flip = "|flip_lr" if a.flip else ""
  c.pp_train = ("decode|inception_crop({size}, area_min=0.65, ratio_min=0.8, "
                f"ratio_max=1.25){flip}|value_range(-1, 1)")
  c.pp_eval = "decode|resize({size})|value_range(-1, 1)"
  c.data_threads = 0
  c.batch_size = c.eval_batch_size = 64
  c.total_steps, c.total_epochs = 0, 30.0
  c.log_every_steps = 50
  c.eval_every_steps, c.eval_every_epochs = 0, 5.0
  c.checkpoint_every_steps, c.checkpoint_every_epochs = 0, 5.0
  c.optimizer = "adamw"
  c.lr, c.lr_batch_base, c.weight_decay = 1e-3, 0, 0.05
  c.schedule.update(warmup_steps=0, warmup_epochs=0.5, decay="cosine")
  c.label_smoothing = 0.1
  c.grad_clip_norm = 1.0
  if a.runlocal:
    if not a.data_dir:  # nothing to read: check the model and trainer on synthetic data
      common.apply_runlocal(c, image_size=size)
    c.model.depth = 2
    c.batch_size = c.eval_batch_size = 16
    c.total_steps, c.total_epochs = 50, 0.0
    c.log_every_steps = 10
    c.eval_every_epochs = 0.0
    c.checkpoint_every_steps, c.checkpoint_every_epochs = 25, 0.0
    c.schedule.update(warmup_steps=5, warmup_epochs=0.0)
  return c
