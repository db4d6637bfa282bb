r"""Fine-tune any weights (a run of ours, big_vision npz, timm, pycls) at any resolution.

Command (ImageNet at 384 px, as DeiT fine-tunes; a TPU pod slice or an 8-GPU node):
    python -m convstem_jax.main \
        --config=configs/finetune.py:init=gs://BUCKET/vit_b_srelu,data=imagenet2012,size=384 \
        --workdir=gs://BUCKET/vit_b_srelu_384
On an image folder or ELPV, on a CPU (the README's measured example):
    python -m convstem_jax.main --config=configs/finetune.py:init=workdirs/elpv,data=elpv,size=96 \
        --workdir=workdirs/elpv_96 --config.lr=1e-4 --config.total_steps=300
Evaluate the weights as imported, before any step (resampled position embedding):
    ... same --config ... --workdir=workdirs/elpv_96_before --mode=eval
Arguments (comma list after ':'):
    init=PATH       the weights: a workdir or checkpoint dir of ours, .npz, .safetensors,
                    .pth / .pyth (config.init_from; read by convstem_jax/weights)
    model=NAME      the model the weights belong to (convstem_jax.models.model_names());
                    default: the one the weights record (a run's config.json, or the
                    files tools/export writes); other files need it named
    data=NAME       a tfds dataset name (default imagenet2012), elpv, or folder
    data_dir=PATH   the folder for data=folder (configs/folder.py's layout), or a tfds dir
    classes=N       class count (default: the dataset's); another count than the source's
                    starts a new head
    size=N          fine-tuning resolution (default 384); the stem's stride must divide it
    epochs=N        default 30
    runlocal        20 steps at batch 16 on synthetic data (the default data), from init
                    if given, else from a fresh model: it checks the machinery only
Recipe: the three papers publish no fine-tuning recipe (papers.md), so the default is
DeiT's 384 px fine-tuning command (github.com/facebookresearch/deit README): AdamW,
lr 5e-6 per 512 images, weight decay 1e-8, 30 epochs, 5 warmup epochs from 1e-6 and
no decay below 5e-6 (so constant), label smoothing 0.1; for tfds data DeiT's
augmentation (RandAugment, random erasing, mixup/CutMix, repeated augmentation), for
elpv and folder that of their own configs. Position embeddings are resampled
bilinearly to the new grid; BatchNorm statistics of conv stems keep training.
Expected result: DeiT-B 81.8% at 224 px -> 83.1% after this fine-tuning at 384 px
(Touvron et al. 2021, abstract and Table 7); not run here. ELPV 64 -> 96 px on a CPU:
71.4% -> 68.3% after 300 steps (72.5% staying at 64 px), see the README.
"""

import importlib.util
import os

from convstem_jax import config as common
from convstem_jax import errors
from convstem_jax.weights import files as weights_files

HERE = os.path.dirname(os.path.abspath(__file__))


def _config_of(name, arg):
  """Another config file of this directory, as main would load it."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _tfds_classes(name, data_dir):
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tfds.builder(name, data_dir=data_dir or None).info.features["label"].num_classes
  except Exception:  # pylint: disable=broad-except
    return 0


def get_config(arg=None):
  a = common.parse_arg(arg, init="", model="", data="imagenet2012", data_dir="", classes=0,
                       size=384, epochs=30, runlocal=False)
  if not a.init and not a.runlocal:
    raise errors.UserError("configs/finetune.py needs the weights to start from: "
                           "--config=configs/finetune.py:init=PATH,...")
  c = common.base_config()
  c.init_from = a.init
  if a.runlocal and not a.init and not a.model:
    a.model = "vitc_1gf"
  if a.data in ("elpv", "folder"):  # their data and augmentation, from their configs
    args = f"data_dir={a.data_dir}" if a.data == "folder" and a.data_dir else ""
    data = _config_of(a.data, args)
    for key in ("dataset", "data_dir", "train_split", "eval_splits", "num_classes",
                "pp_train", "pp_eval", "data_threads", "folder_test_fraction",
                "folder_split_seed"):
      if key in data:
        c[key] = data[key]
  else:
    c.dataset, c.data_dir = a.data, a.data_dir
    if a.data != "imagenet2012":
      c.eval_splits = ("test",)
      c.num_classes = a.classes or _tfds_classes(a.data, a.data_dir) or c.num_classes
    c.pp_train = ("inception_crop({size})|flip_lr|randaug(2, 9, 0.5)|normalize|"
                  "random_erasing(0.25)")
    c.pp_eval = "decode|resize_small({eval_resize})|central_crop({size})|normalize"
    c.mixup_alpha, c.cutmix_alpha = 0.8, 1.0
    c.repeated_aug = 3
  if a.classes:
    c.num_classes = a.classes
  source = weights_files.model_of(a.init) if a.init else None
  if a.model:
    c.model_name = a.model
  elif source:
    c.model_name = source[0]
    c.model.update({k: v for k, v in source[1].items() if k in c.model or v is not None})
  else:
    raise errors.UserError(f"Name the model of {a.init}: configs/finetune.py:...,model=NAME "
                           "(one of convstem_jax.models.model_names()).")
  c.image_size = a.size
  # DeiT's fine-tuning (module docstring).
  c.optimizer = "adamw"
  c.optimizer_kw.eps = 1e-8
  c.lr, c.lr_batch_base, c.weight_decay = 5e-6, 512, 1e-8
  c.schedule.update(warmup_epochs=5.0, warmup_steps=0, warmup_lr=1e-6, decay="cosine",
                    end_lr=5e-6)
  c.label_smoothing = 0.1
  c.total_epochs, c.total_steps = float(a.epochs), 0
  c.batch_size = c.eval_batch_size = 512
  c.eval_every_epochs, c.eval_every_steps = 1.0, 0
  c.checkpoint_every_epochs, c.checkpoint_every_steps = 1.0, 0
  if a.data in ("elpv", "folder"):
    c.batch_size = c.eval_batch_size = 64
    c.log_every_steps = 50
  if a.runlocal:
    if a.data == "imagenet2012":  # not on a laptop: synthetic images, 2 blocks, 64 px
      depth = c.model.get("depth")
      common.apply_runlocal(c, image_size=64 if a.size == 384 else a.size)
      if a.init:  # the source's depth, or its weights would not fit
        if depth is None:
          del c.model["depth"]
        else:
          c.model.depth = depth
    c.batch_size = c.eval_batch_size = 16
    c.total_epochs, c.total_steps = 0.0, 20
    c.schedule.update(warmup_epochs=0.0, warmup_steps=2)
    c.eval_every_epochs, c.checkpoint_every_epochs = 0.0, 0.0
    c.checkpoint_every_steps = 10
    c.log_every_steps = 5
    c.mixup_alpha = c.cutmix_alpha = 0.0
    c.repeated_aug = 1
  return c
