"""Mistakes a new user makes end in one `error:` line that says what to do.

Each case is a real `python -m convstem_jax.main` process: it must exit non-zero, print
exactly one line starting with `error: ` (naming the fix: the case's words), print no
Python traceback, and leave the checkpoints of the finished run it points at (a copy
per case) byte-identical. The cases run a few at a time, so the file stays cheap.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import pathlib
import shutil

import numpy as np
import pytest

from cli_util import run_cli

ELPV = "--config=configs/elpv.py:runlocal"
FOLDER = "--config=configs/folder.py:runlocal,data_dir={tmp}/{folder}"

# (id, arguments, words the error line must hold, setup of {tmp} before the run).
# {run} is a copy of a finished ELPV run's workdir, {tmp} a fresh directory.
CASES = [
    # ---- flags and config files
    ("no_such_config", ["--config=configs/elpvv.py", "--workdir={run}"],
     ["does not exist", "shipped: "], None),
    ("config_syntax_error", ["--config={tmp}/broken.py", "--workdir={run}"],
     ["syntax error", "line 2"], "broken_config"),
    ("config_without_get_config", ["--config={tmp}/empty.py", "--workdir={run}"],
     ["get_config"], "empty_config"),
    ("unknown_config_argument", ["--config=configs/elpv.py:runlocal,bogus",
                                 "--workdir={run}"], ["bogus", "valid"], None),
    ("typo_in_field", [ELPV, "--workdir={run}", "--config.bach_size=8"],
     ["bach_size", "batch_size"], None),
    ("typo_in_nested_field", [ELPV, "--workdir={run}", "--config.model.dropuot=0.1"],
     ["model.dropuot", "dropout"], None),
    ("field_of_wrong_type", [ELPV, "--workdir={run}", "--config.batch_size=many"],
     ["batch_size", "many"], None),
    ("unknown_flag", [ELPV, "--workdri={run}"], ["workdri"], None),
    ("missing_workdir", [ELPV], ["workdir"], None),
    ("positional_argument", [ELPV, "--workdir={run}", "train"], ["train", "--name=value"],
     None),
    ("unknown_mode", [ELPV, "--workdir={run}", "--mode=evaluate"], ["mode"], None),
    ("partial_multiprocess_flags", [ELPV, "--workdir={run}", "--num_processes=2"],
     ["--coordinator_address"], None),
    # ---- numbers that cannot work
    ("zero_batch", [ELPV, "--workdir={run}", "--config.batch_size=0"], ["batch_size"],
     None),
    ("batch_not_divisible_by_devices", [ELPV, "--workdir={tmp}/w", "--config.batch_size=15"],
     ["batch_size", "devices"], None),
    ("negative_learning_rate", [ELPV, "--workdir={run}", "--config.lr=-0.001"],
     ["lr", "negative"], None),
    ("ema_decay_above_one", [ELPV, "--workdir={tmp}/w", "--config.ema_decay=1.5"],
     ["ema_decay"], None),
    ("steps_and_epochs_both_set", [ELPV, "--workdir={run}", "--config.total_steps=10",
                                   "--config.total_epochs=2"], ["total_epochs=0"], None),
    ("image_size_not_divisible", [ELPV, "--workdir={tmp}/w", "--config.image_size=30"],
     ["30"], None),
    ("unknown_model", [ELPV, "--workdir={run}", "--config.model_name=vit_huge"],
     ["vit_huge", "valid names"], None),
    ("unknown_optimizer", [ELPV, "--workdir={tmp}/w", "--config.optimizer=adam"],
     ["adam", "adamw"], None),
    ("unknown_schedule", [ELPV, "--workdir={tmp}/w", "--config.schedule.decay=exp"],
     ["exp", "cosine"], None),
    ("mesh_axis_not_implemented", [ELPV, "--workdir={tmp}/w",
                                   "--config.mesh=(('data', 1), ('model', 2))"],
     ["model"], None),
    # ---- data
    ("unknown_dataset", [ELPV, "--workdir={tmp}/w", "--config.dataset=imagenet9000"],
     ["imagenet9000"], None),
    ("unknown_split", [ELPV, "--workdir={tmp}/w", "--config.eval_splits=('val',)"],
     ["'val'", "test"], None),
    ("unknown_preprocessing_op", [ELPV, "--workdir={tmp}/w",
                                  "--config.pp_train=decode|resize({size})|sharpen"],
     ["sharpen"], None),
    ("tfds_dataset_not_downloaded", [ELPV, "--workdir={tmp}/w", "--config.dataset=cifar10",
                                     "--config.data_dir={tmp}/nothing"], ["cifar10"], None),
    ("folder_missing", [FOLDER.format(tmp="{tmp}", folder="nowhere"), "--workdir={tmp}/w"],
     ["nowhere"], None),
    ("folder_with_one_class", [FOLDER.format(tmp="{tmp}", folder="one"), "--workdir={tmp}/w"],
     ["1 class", "two class"], "one_class_folder"),
    ("folder_without_images", [FOLDER.format(tmp="{tmp}", folder="empty"),
                               "--workdir={tmp}/w"], ["no images"], "empty_folder"),
    ("more_classes_than_the_config", [FOLDER.format(tmp="{tmp}", folder="three"),
                                      "--workdir={tmp}/w", "--config.num_classes=2"],
     ["3 classes", "num_classes"], "three_class_folder"),
    # ---- workdirs and checkpoints
    ("workdir_is_a_file", [ELPV, "--workdir={tmp}/file"], ["is a file"], "a_file"),
    ("resume_with_another_model", [ELPV, "--workdir={run}", "--config.model.depth=3"],
     ["different model", "config.json"], None),
    ("eval_without_checkpoints", [ELPV, "--workdir={tmp}/w", "--mode=eval"],
     ["checkpoint"], None),
    ("eval_of_a_missing_step", [ELPV, "--workdir={run}", "--mode=eval", "--checkpoint=99"],
     ["99", "available"], None),
    ("eval_of_a_missing_path", [ELPV, "--workdir={run}", "--mode=eval",
                                "--checkpoint={tmp}/nothing/7"], ["nothing"], None),
    ("init_from_missing", [ELPV, "--workdir={tmp}/w", "--config.init_from={tmp}/nothing"],
     ["nothing"], None),
    ("init_from_another_model", ["--config=configs/elpv.py:runlocal,stem=patchify",
                                 "--workdir={tmp}/w", "--config.init_from={run}"],
     ["does not fit this model", "stem/conv_0"], None),
    ("init_from_foreign_and_missing_keys", [ELPV, "--workdir={tmp}/w",
                                            "--config.init_from={tmp}/other.npz"],
     ["does not fit this model", "encoderblock_0/Foo/kernel",
      "params/block_1/attn/qkv/kernel", "params/stem/embedding/kernel (params/embedding/kernel) (16, 16, 3, 192) in the file"],
     "foreign_npz"),
    ("init_from_not_a_vit", [ELPV, "--workdir={tmp}/w",
                             "--config.init_from={tmp}/resnet.safetensors"],
     ["neither a timm nor a pycls", "conv1.weight"], "resnet_safetensors"),
    ("init_from_unknown_format", [ELPV, "--workdir={tmp}/w",
                                  "--config.init_from={tmp}/model.h5"],
     [".safetensors", "suffix '.h5'"], "h5_file"),
]


def setup_case(kind: str | None, tmp: pathlib.Path) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)

  def images(folder: pathlib.Path, n: int):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
      Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(folder / f"{i}.png")

  if kind == "broken_config":
    (tmp / "broken.py").write_text("def get_config(arg=None):\n  return (\n")
  elif kind == "empty_config":
    (tmp / "empty.py").write_text('"""A config that forgot its function."""\n')
  elif kind == "one_class_folder":
    images(tmp / "one" / "cats", 8)
  elif kind == "empty_folder":
    for c in ("a", "b"):
      (tmp / "empty" / c).mkdir(parents=True)
      (tmp / "empty" / c / "notes.txt").write_text("not an image")
  elif kind == "three_class_folder":
    for c in ("a", "b", "c"):
      images(tmp / "three" / c, 6)
  elif kind == "foreign_npz":  # big_vision names, a patchify embedding, a stray layer
    np.savez(tmp / "other.npz", **{
        "params/embedding/kernel": np.zeros((16, 16, 3, 192), np.float32),
        "params/Transformer/encoderblock_0/Foo/kernel": np.zeros((4, 4), np.float32)})
  elif kind == "resnet_safetensors":
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file({"conv1.weight": np.zeros((8, 3, 7, 7), np.float32),
               "fc.weight": np.zeros((4, 8), np.float32)}, str(tmp / "resnet.safetensors"))
  elif kind == "h5_file":
    (tmp / "model.h5").write_bytes(b"HDF")
  elif kind == "a_file":
    (tmp / "file").write_text("a file where the workdir belongs")


def digest(workdir: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted((workdir / "checkpoints").rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
  finished = tmp_path_factory.mktemp("finished") / "run"
  r = run_cli(ELPV, f"--workdir={finished}", "--config.total_steps=2", num_devices=2)
  assert r.returncode == 0, str(r)
  before = digest(finished)

  def one(case):
    name, args, _, kind = case
    tmp = tmp_path_factory.mktemp(name)
    run = tmp / "run"
    shutil.copytree(finished, run)
    setup_case(kind, tmp)
    result = run_cli(*[a.replace("{run}", str(run)).replace("{tmp}", str(tmp))
                       for a in args], num_devices=2,
                     timeout=180)
    return name, (result, digest(run))

  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    return before, dict(pool.map(one, CASES))


def test_at_least_25_distinct_mistakes():
  assert len({c[0] for c in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize("name,args,words,kind", CASES, ids=[c[0] for c in CASES])
def test_mistake_is_one_error_line(outcomes, name, args, words, kind):
  before, results = outcomes
  result, after = results[name]
  assert result.returncode != 0, str(result)
  output = result.stdout + result.stderr
  assert "Traceback" not in output, str(result)
  lines = [l for l in output.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, str(result)
  for word in words:
    assert word in lines[0], f"{word!r} not in {lines[0]!r}"
  assert after == before, "the finished run's checkpoints changed"
