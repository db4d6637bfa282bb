r"""Train `configs/structured_init.py` for each attention init x seed; print a table.

    python -m convstem_jax.tools.compare_inits --dataset=elpv --config_args=cpu \
        --inits=default,mimetic,impulse3,impulse5 --seeds=0,1 --workdir=/tmp/si_elpv
    python -m convstem_jax.tools.compare_inits --time_init   # init times, full vit_ti2_32

Runs go one at a time, in this process, seed-major (every init for seed 0, then seed 1,
...), each in `<workdir>/<init>_s<seed>`; rerunning the command resumes or skips finished
runs (a finished run's numbers are read back from its metrics.jsonl). Each run is the
same as

    python -m convstem_jax.main \
        --config=configs/structured_init.py:dataset=D,init=I,seed=S[,ARGS] \
        --workdir=<workdir>/<I>_s<S>

The table (markdown, printed last) has the final test accuracy of every seed, their mean
± half range (max - min) / 2 — with two seeds the two numbers are the mean ± that — and,
unless --noscore, the attention diagnostic of the final checkpoint:
`convstem_jax.diagnostics.attention.score_model` on a blank image, window 5, the share of
interior queries whose argmax is the head's most common offset (an impulse map scores 1,
a uniform one about 1/N; a map peaked on the query itself, offset (0, 0), also scores
high), averaged over block 0's heads / over every block's heads.

`--time_init` times `model.init` of the full vit_ti2_32 (12 blocks, 10 classes) for each
init, jitted as the trainer does: the first call (tracing, compilation, the impulse fit)
and a second call with another key (the compiled init alone), and scores the init itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pathlib
import statistics
import sys
import time

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "structured_init.py"
ALL_INITS = ("default", "mimetic", "impulse3", "impulse5", "impulse3_closed",
             "impulse5_closed")
SCORE_WINDOW = 5


def load_config_module(path):
  spec = importlib.util.spec_from_file_location("structured_init_config", str(path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def config_arg(dataset: str, init: str, seed: int, extra: str) -> str:
  return ",".join(filter(None, [f"dataset={dataset}", f"init={init}", f"seed={seed}",
                                extra]))


def final_metrics(workdir) -> dict | None:
  """The last metrics.jsonl record with a test accuracy, or None."""
  from convstem_jax import metrics  # pylint: disable=g-import-not-at-top
  return next((r for r in reversed(metrics.read_records(workdir)) if "test/accuracy" in r),
              None)


def attention_score(config, workdir) -> tuple[float, float]:
  """Mean argmax share (window 5) of the final checkpoint: block 0's heads, all heads."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from convstem_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from convstem_jax.diagnostics import attention  # pylint: disable=g-import-not-at-top
  from convstem_jax.models import model_from_config  # pylint: disable=g-import-not-at-top
  model = model_from_config(config)
  ckpt, step = ckpt_lib.resolve(str(workdir))
  x = jnp.zeros((1, model.img_size, model.img_size, 3), jnp.float32)
  # Shapes only: eval_shape traces init without running an impulse fit.
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  abstract = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
  variables = ckpt.restore_model(step, abstract)
  ckpt.close()
  scores = attention.score_model(model, variables, window=SCORE_WINDOW)
  return (float(np.mean([h.argmax_fraction for h in scores[0]])),
          float(np.mean([h.argmax_fraction for block in scores.values() for h in block])))


def run_one(module, dataset, init, seed, extra, workdir, score: bool) -> dict:
  from convstem_jax import train  # pylint: disable=g-import-not-at-top
  config = module.get_config(config_arg(dataset, init, seed, extra))
  done = final_metrics(workdir)
  saved = pathlib.Path(workdir) / "compare_inits.json"
  t0 = time.perf_counter()
  if done is None or done["step"] < _total_steps(config):
    train.train_and_evaluate(config, str(workdir))
    wall = time.perf_counter() - t0
  else:  # finished before: its training time as recorded then, if it was
    wall = json.loads(saved.read_text()).get("wall_s") if saved.exists() else None
  rec = final_metrics(workdir)
  if rec is None:
    raise RuntimeError(f"{workdir}: training wrote no test accuracy to metrics.jsonl.")
  out = {"init": init, "seed": seed, "accuracy": rec["test/accuracy"],
         "step": rec["step"], "wall_s": wall}
  if score:
    out["score"] = attention_score(config, workdir)
  saved.write_text(json.dumps(out, indent=2))
  return out


def _total_steps(config) -> int:
  """The run's length as the trainer computes it (epochs need the data source's size)."""
  from convstem_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from convstem_jax import train  # pylint: disable=g-import-not-at-top
  if config.total_steps:
    return int(config.total_steps)
  source = data_lib.get_source(config, config.train_split)
  return train.durations(config, source.num_examples).total_steps


def spread(values):
  return (max(values) - min(values)) / 2 if values else math.nan


def table(results, inits, seeds, score: bool) -> str:
  head = (["init"] + [f"seed {s}" for s in seeds] + ["mean ± half range"] +
          (["attention score, block 0 / all"] if score else []) + ["wall per run"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for init in inits:
    rows = {r["seed"]: r for r in results if r["init"] == init}
    accs = [100 * rows[s]["accuracy"] for s in seeds if s in rows]
    cells = [init] + [f"{100 * rows[s]['accuracy']:.1f}" if s in rows else "-"
                      for s in seeds]
    cells.append(f"{statistics.mean(accs):.1f} ± {spread(accs):.1f}" if accs else "-")
    if score:
      sc = [rows[s]["score"] for s in seeds if s in rows and "score" in rows[s]]
      cells.append(f"{statistics.mean(b for b, _ in sc):.2f} / "
                   f"{statistics.mean(a for _, a in sc):.2f}" if sc else "-")
    walls = [rows[s]["wall_s"] for s in seeds if s in rows and rows[s]["wall_s"]]
    cells.append(f"{statistics.mean(walls):.0f} s" if walls else "-")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def time_inits(inits, num_classes: int = 10) -> str:
  """Markdown table: jitted init of the full vit_ti2_32 per init kind."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from convstem_jax.diagnostics import attention  # pylint: disable=g-import-not-at-top
  from convstem_jax.models import create_model  # pylint: disable=g-import-not-at-top
  lines = ["| init | first jitted init (trace + compile + run) | second call (run) | "
           "attention score at init, block 0 / mean |", "|---|---|---|---|"]
  for init in inits:
    model = create_model("vit_ti2_32", num_classes=num_classes, attention_init=init)
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    init_fn = jax.jit(lambda key, m=model: m.init(key, x, train=False))
    t0 = time.perf_counter()
    variables = jax.block_until_ready(init_fn(jax.random.PRNGKey(0)))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(init_fn(jax.random.PRNGKey(1)))
    second = time.perf_counter() - t0
    scores = attention.score_model(model, variables, window=SCORE_WINDOW)
    block0 = np.mean([h.argmax_fraction for h in scores[0]])
    mean = np.mean([h.argmax_fraction for b in scores.values() for h in b])
    lines.append(f"| {init} | {first:.1f} s | {second:.2f} s | {block0:.2f} / {mean:.2f} |")
    print(lines[-1], flush=True)
  return "\n".join(lines)


def quiet_library_logs():
  """The trainer's progress at INFO; orbax / clu / jax.distributed warnings only (as
  convstem_jax.main does, here without absl's app)."""
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.use_absl_handler()  # what app.run would do: absl's format, to stderr
  logging.set_verbosity(logging.INFO)
  noisy = ("/orbax/", "/jax/_src/distributed", "/clu/")

  class Filter(py_logging.Filter):
    def filter(self, record):
      return record.levelno >= py_logging.WARNING or not any(
          n in record.pathname for n in noisy)

  py_logging.getLogger("absl").addFilter(Filter())


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dataset", default="elpv")
  p.add_argument("--inits", default="default,mimetic,impulse3,impulse5")
  p.add_argument("--seeds", default="0,1")
  p.add_argument("--workdir", default="")
  p.add_argument("--config", default=str(DEFAULT_CONFIG),
                 help="the config file (default: configs/structured_init.py)")
  p.add_argument("--config_args", default="",
                 help="more config arguments, e.g. 'cpu' or 'runlocal,steps=2'")
  p.add_argument("--steps", type=int, default=0, help="override: steps=N")
  p.add_argument("--noscore", action="store_true", help="skip the attention score")
  p.add_argument("--time_init", action="store_true",
                 help="only time model.init of the full vit_ti2_32 per init")
  a = p.parse_args(argv)
  a.inits = [s for s in a.inits.split(",") if s]
  bad = [i for i in a.inits if i not in ALL_INITS]
  if bad:
    p.error(f"unknown init(s) {', '.join(bad)}; valid: {', '.join(ALL_INITS)}")
  try:
    a.seeds = [int(s) for s in a.seeds.split(",") if s]
  except ValueError:
    p.error(f"--seeds takes integers separated by commas, not '{a.seeds}'")
  if not a.time_init and not a.workdir:
    p.error("--workdir is required (each run writes <workdir>/<init>_s<seed>)")
  return a


def main(argv=None) -> str:
  a = parse_args(sys.argv[1:] if argv is None else argv)
  if a.time_init:
    out = time_inits(a.inits)
    print(out)
    return out
  quiet_library_logs()
  module = load_config_module(a.config)
  extra = ",".join(filter(None, [a.config_args, f"steps={a.steps}" if a.steps else ""]))
  results = []
  for seed in a.seeds:
    for init in a.inits:
      workdir = pathlib.Path(a.workdir) / f"{init}_s{seed}"
      print(f"--- {init} seed {seed}: python -m convstem_jax.main "
            f"--config={os.path.relpath(a.config)}:{config_arg(a.dataset, init, seed, extra)}"
            f" --workdir={workdir}", flush=True)
      r = run_one(module, a.dataset, init, seed, extra, workdir, not a.noscore)
      results.append(r)
      print(f"--- {init} seed {seed}: test accuracy {100 * r['accuracy']:.2f}% at step "
            f"{r['step']}" + (f", {r['wall_s']:.0f} s" if r["wall_s"] else "")
            + (", attention score {:.2f} / {:.2f}".format(*r["score"]) if "score" in r
               else ""), flush=True)
  out = table(results, a.inits, a.seeds, not a.noscore)
  pathlib.Path(a.workdir, "table.md").write_text(out + "\n")
  print(out)
  return out


if __name__ == "__main__":
  main()
