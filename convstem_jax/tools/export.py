r"""Export a run's weights for big_vision / timm users.

    python -m convstem_jax.tools.export --workdir=W --format=npz --out=model.npz
    python -m convstem_jax.tools.export --workdir=W --format=timm --out=model.safetensors
        [--checkpoint=STEP] [--ema]

`npz`: big_vision's ViT names (flat `params/...` keys; conv stems under
`params/stem/...` and `batch_stats/...`, see convstem_jax/weights/big_vision.py), read by
big_vision's `vit.load` and by timm's `load_pretrained` (patchify models, with
`no_embed_class=True`). `timm`: a safetensors state dict that the printed
`timm.create_model(...)` call loads with `load_state_dict(strict=True)`.
The model is rebuilt from the run's config.json, and the files record it (model name and
overrides), so `configs/finetune.py:init=FILE` rebuilds it too; the checkpoint is the
latest unless --checkpoint names a step; --ema exports the EMA weights. Both files
import back (`config.init_from=FILE`) to the same values, bit for bit.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import numpy as np
import safetensors.numpy
from etils import epath

from convstem_jax import config as config_lib
from convstem_jax import errors
from convstem_jax.models import model_from_config
from convstem_jax.weights import big_vision, files, timm


def export(workdir: str, fmt: str, out: str, checkpoint: str = "", ema: bool = False) -> str:
  """Writes the file; returns what to tell the user (for timm, the constructor)."""
  config = config_lib.run_config(workdir)
  model = model_from_config(config)
  record = files.describe_model(config.model_name, dict(config.model))
  step_dir = workdir if not checkpoint else str(
      epath.Path(workdir) / "checkpoints" / checkpoint)
  t0 = time.perf_counter()
  flat = files.read(step_dir, ema=ema).tensors
  t_read = time.perf_counter() - t0
  path = epath.Path(out)
  path.parent.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  if fmt == "npz":
    arrays = big_vision.to_npz(flat, model)
    with path.open("wb") as f:
      np.savez(f, **arrays, **{files.MODEL_KEY: np.array(record)})
    note = "big_vision names; timm: create the model with no_embed_class=True"
  else:
    state, code = timm.to_timm(flat, model)
    path.write_bytes(safetensors.numpy.save(state, metadata={"format": "pt", files.MODEL_KEY: record}))
    note = "load it in PyTorch with:\n" + code.replace("PATH", repr(str(path)))
  return (f"Wrote {path} ({path.stat().length / 2**20:.1f} MiB; read {t_read:.1f} s, "
          f"written {time.perf_counter() - t0:.1f} s); {note}")


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a training run's workdir")
  p.add_argument("--checkpoint", default="", help="a step (default: the latest)")
  p.add_argument("--ema", action="store_true", help="export the EMA weights")
  p.add_argument("--format", required=True, choices=("npz", "timm"))
  p.add_argument("--out", required=True, help="the file to write")
  a = p.parse_args(argv)
  try:
    print(export(a.workdir, a.format, a.out, a.checkpoint, a.ema))
  except errors.UserError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  main(sys.argv[1:])
