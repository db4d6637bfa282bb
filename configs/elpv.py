r"""A conv-stem ViT trained from scratch on ELPV (solar-cell defects, 4 classes) on a CPU.

Command (a laptop / 2-core CPU, about 5-6 minutes; evaluate the checkpoint after):
    python -m convstem_jax.main --config=configs/elpv.py --workdir=workdirs/elpv
    python -m convstem_jax.main --config=configs/elpv.py --workdir=workdirs/elpv --mode=eval
Arguments (comma list after ':'):
    stem=conv|patchify|srelu   the stem: Xiao's 1GF conv stem (default), a 16x16
                               patchify stem, or the scaled-ReLU stem, same body
    size=N                     image size (default 64; ELPV images are 300x300)
    depth=N                    transformer blocks (default 6)
    steps=N                    training steps (default 1500, batch 64)
    warmup=N                   linear warmup steps (default 100)
    opt=adamw|sgd              AdamW lr 1e-3, wd 0.05 (default), or SGD (Nesterov
                               momentum 0.9, L2) lr 0.1, wd 5e-5: the centres of the
                               stability sweeps (tools/sweep draws [v/8, 4v] around them)
    runlocal                   2 blocks at 32 px, 50 steps: checks the machinery in ~1 min
Data: `pip install elpv-dataset` (bundled images, no download at run time); a fixed
stratified 75/25 split (convstem_jax/data/elpv.py): 1,970 train, 654 test images.
Expected result: always answering "functional" scores 57.5%; the published CNN baseline
(Deitsch et al. 2019, at 300 px) is about 88%. Our measured result for this config is
in the README.
"""

from convstem_jax import config as common
from convstem_jax import errors

# lr, weight decay at batch 64. SGD's pair is ours (papers.md: Xiao's Table 4 has SGD
# wd 1.3e-5..2.7e-5 at batch 2048): a 200-step conv-stem pilot at 48 px gave 72.0% with
# lr 0.1 and 70.8% with 0.03.
OPTIMIZERS = {"adamw": (1e-3, 0.05), "sgd": (0.1, 5e-5)}
STEMS = {"conv": ("vitc_1gf", {}),
         "patchify": ("vitp_1gf", {}),
         "srelu": ("vit_ti16_srelu", {"mlp_dim": 576})}


def get_config(arg=None):
  a = common.parse_arg(arg, stem="conv", size=64, depth=6, steps=1500, warmup=100,
                       opt="adamw", runlocal=False)
  if a.stem not in STEMS:
    raise errors.UserError(f"Unknown stem '{a.stem}'; valid: {', '.join(STEMS)}.")
  if a.opt not in OPTIMIZERS:
    raise errors.UserError(f"Unknown opt '{a.opt}'; valid: {', '.join(OPTIMIZERS)}.")
  c = common.base_config()
  c.dataset = "elpv"
  c.train_split, c.eval_splits = "train", ("test",)
  c.num_classes = 4
  c.image_size = a.size
  c.model_name, extra = STEMS[a.stem]
  c.model.update(depth=a.depth, dtype="float32", **extra)
  # Cells are symmetric under both flips. Light augmentation only: at this budget the
  # model underfits, and a random-resized crop (area 0.6-1) plus label smoothing 0.1
  # ended at 68.3% after 2,000 steps, against 71.3% for flips alone after 400.
  c.pp_train = "decode|resize({size})|flip_lr|flip_ud|value_range(-1, 1)"
  c.pp_eval = "decode|resize({size})|value_range(-1, 1)"
  c.data_threads = 0
  c.batch_size = c.eval_batch_size = 64
  c.total_steps, c.total_epochs = a.steps, 0.0
  c.log_every_steps = 100
  c.eval_every_steps, c.eval_every_epochs = 500, 0.0
  c.checkpoint_every_steps = 1000
  c.optimizer = a.opt
  c.lr, c.weight_decay = OPTIMIZERS[a.opt]
  c.lr_batch_base = 0
  c.schedule.update(warmup_steps=a.warmup, warmup_epochs=0.0, decay="cosine")
  c.label_smoothing = 0.0
  c.grad_clip_norm = 1.0
  if a.runlocal:
    c.image_size = 32
    c.model.depth = 2
    c.batch_size = c.eval_batch_size = 16
    c.total_steps = 50
    c.log_every_steps = 10
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 25
    c.schedule.warmup_steps = 5
  return c
