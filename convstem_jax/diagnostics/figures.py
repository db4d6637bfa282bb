"""Figures of diagnostics and training curves (matplotlib, written as PNG files)."""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib
matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

from convstem_jax import metrics  # noqa: E402

# measure -> (title, y label, per-head?, reference key)
MEASURES = {
    "token_similarity": ("Patch-token similarity per layer (mean |cos|, Gong et al.)",
                         "mean |cos| between patch tokens", False, None),
    "rank_collapse_ratio": ("Rank-collapse ratio per layer (Dong et al.)",
                            "||X - 1 mean(X)|| / ||X||", False, None),
    "mean_attention_distance_px": ("Mean attention distance per head and block",
                                   "pixels", True, "uniform_distance_px"),
    "attention_entropy": ("Attention entropy per head and block", "nats", True,
                          "uniform_entropy"),
}


def _save(fig, path) -> str:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  return str(path)


def measure_figure(results: Mapping[str, dict], measure: str, path) -> str:
  """One measure of one or several runs (labels = run names), layer by layer."""
  title, ylabel, per_head, reference = MEASURES[measure]
  fig, ax = plt.subplots(figsize=(7, 4))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for k, (label, r) in enumerate(results.items()):
    color = colors[k % len(colors)]
    layers = r["layers"][1:] if per_head else r["layers"]
    values = r[measure]
    xs = np.arange(len(layers))
    if per_head:
      for i, heads in enumerate(values):
        ax.scatter(np.full(len(heads), i) + 0.08 * (k - len(results) / 2), heads, s=14,
                   color=color, alpha=0.6)
      ax.plot(xs, [np.mean(h) for h in values], color=color, label=f"{label} (head mean)")
      if reference:
        ax.axhline(r[reference], color=color, ls=":", lw=1,
                   label=f"{label}: uniform attention")
    else:
      ax.plot(xs, values, marker="o", color=color, label=label)
    ax.set_xticks(xs, layers, rotation=45, ha="right")
  ax.set_title(title)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def attention_maps_figure(result: dict, image: np.ndarray, path,
                          heads: Sequence[int] | int = 4, query: tuple[int, int] | None = None,
                          index: int = 0) -> str:
  """Image `index` of the measured ones and, per block (rows) and head (columns; a list
  of head indices, or the first N), where one patch query (default: the grid centre)
  attends, over the patch grid."""
  maps = result["_maps"]
  g, prefix = result["grid"], result["class_tokens"]
  qy, qx = query or (g // 2, g // 2)
  if not (0 <= qy < g and 0 <= qx < g):
    raise ValueError(f"query ({qy}, {qx}) is outside the {g}x{g} patch grid")
  q = prefix + qy * g + qx
  n_heads = maps[0].shape[1]
  heads = list(range(min(heads, n_heads))) if isinstance(heads, int) else list(heads)
  if any(not 0 <= h < n_heads for h in heads):
    raise ValueError(f"heads {heads}: the model has heads 0-{n_heads - 1}")
  fig, axes = plt.subplots(len(maps), len(heads) + 1, figsize=(1.8 * (len(heads) + 1),
                                                               1.8 * len(maps)), squeeze=False)
  shown = (image - image.min()) / max(float(np.ptp(image)), 1e-6)
  for b, block in enumerate(maps):
    axes[b, 0].imshow(shown)
    p = result["patch_px"]
    axes[b, 0].add_patch(plt.Rectangle((qx * p, qy * p), p, p, fill=False, color="red"))
    axes[b, 0].set_ylabel(f"block {b}", fontsize=8)
    for col, h in enumerate(heads):
      row = block[index, h, q, prefix:].reshape(g, g)
      axes[b, col + 1].imshow(row, cmap="viridis")
      axes[b, col + 1].plot(qx, qy, "r+")
      if b == 0:
        axes[b, col + 1].set_title(f"head {h}", fontsize=8)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(f"Attention of the query patch ({qy}, {qx}) (red), image {index}", fontsize=9)
  return _save(fig, path)


def curves_figure(workdirs: Sequence[str], path, labels: Sequence[str] | None = None) -> str:
  """Training loss, eval accuracy and learning rate of one or several runs."""
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
  for k, workdir in enumerate(workdirs):
    label = labels[k] if labels else epath.Path(workdir).name
    rows = metrics.read_records(workdir)
    if not rows:
      raise FileNotFoundError(f"{workdir} has no metrics.jsonl records: pass the workdir "
                              "of a training run.")
    for ax, prefix in ((axes[0], "train/loss"), (axes[2], "train/lr")):
      pts = [(r["step"], r[prefix]) for r in rows if prefix in r]
      if pts:
        ax.plot(*zip(*pts), label=label)
    for key in sorted({k for r in rows for k in r if k.endswith("/accuracy")
                       and not k.startswith("train")}):
      pts = [(r["step"], 100 * r[key]) for r in rows if key in r]
      axes[1].plot(*zip(*pts), marker="o", ms=3, label=f"{label}: {key}")
  for ax, title in zip(axes, ("training loss", "eval accuracy (%)", "learning rate")):
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  return _save(fig, path)


def edf_figure(sweeps: Mapping[str, Sequence[float]], path,
               max_delta: float | None = None) -> str:
  """Xiao et al.'s Figures 3-4: per sweep, the fraction of all its trials (failed ones
  included, never reached) whose top-1 error is within Δ points of the sweep's best.
  The Δ axis ends at `max_delta`, by default a point past the largest finite Δ (at
  least 5)."""
  spreads = [max(e for e in errors if np.isfinite(e)) - min(errors)
             for errors in sweeps.values() if any(np.isfinite(e) for e in errors)]
  max_delta = max_delta or max([5.0] + [s + 1.0 for s in spreads])
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, errors in sweeps.items():
    finite = np.sort([e for e in errors if np.isfinite(e)])
    n = len(errors)
    if not len(finite):
      ax.plot([], [], label=f"{label}: 0/{n} scored")
      continue
    deltas = finite - finite[0]
    xs = np.concatenate([[0.0], deltas, [max(max_delta, deltas[-1])]])
    ys = np.concatenate([[0.0], np.arange(1, len(deltas) + 1) / n, [len(deltas) / n]])
    ax.step(xs, ys, where="post",
            label=f"{label}: best error {finite[0]:.1f}%, {len(finite)}/{n} scored")
  for d in (2, 4):
    ax.axvline(d, color="grey", ls=":", lw=1)
  ax.set_xlim(0, max_delta)
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("Δ top-1 error to the sweep's best trial (points)")
  ax.set_ylabel("cumulative fraction of trials")
  ax.set_title("Error EDF of (lr, wd) sweeps (Xiao et al. Figs. 3-4)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  return _save(fig, path)
