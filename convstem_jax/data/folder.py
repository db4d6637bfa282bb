"""A user's own images: one folder per class.

Layouts under `config.data_dir` (the root):
  root/train/<class>/*  +  root/test/<class>/*   (or root/val/, root/validation/)
  root/<class>/*        a single tree: a stratified `config.folder_test_fraction`
                        (default 0.2) of each class is the 'test' split, drawn with the
                        fixed seed `config.folder_split_seed` (default 0)
Classes are the sorted subfolder names of the train tree (label = position). Split names:
'train' and 'test'; 'val' / 'validation' read the same held-out tree.

Files are images by extension (jpg, jpeg, png, gif, bmp, webp, tif, tiff, ppm, pgm);
anything else (notes, .DS_Store, csv) is ignored. Unreadable or corrupt images are
skipped, and their count and first few names are logged in one warning at every start.
Whether an image decodes is checked once and remembered: a manifest of (path, size,
modification time, readable) is written beside the tree (`<tree>/.convstem_manifest.json`;
if the tree is read-only, under $XDG_CACHE_HOME or ~/.cache/convstem_jax/folders/), so
later starts, resumes and the other processes of a run decode only files that are new or
changed since and start in the time it takes to list and stat the tree.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import logging
import os
import stat as stat_lib

import numpy as np

from convstem_jax.data.files import FileSource
from convstem_jax import config as config_lib
from convstem_jax import errors

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff",
                    ".ppm", ".pgm")
HELD_OUT = ("test", "val", "validation")
LAYOUT = ("root/train/<class>/<image> with root/test/<class>/<image> (or val/), or "
          "root/<class>/<image> split by config.folder_test_fraction")


def _readable(path: str) -> bool:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      im.load()
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def _class_images(class_dir: str) -> list[tuple[str, int, int]]:
  """(path, size, mtime_ns) of the images under one class folder, in os.walk order with
  directories and names sorted."""
  found = {}
  stack = [class_dir]
  while stack:
    directory = stack.pop()
    names = []
    with os.scandir(directory) as entries:  # the entry type comes without a stat
      for e in entries:
        if e.is_dir(follow_symlinks=False):
          stack.append(e.path)
        elif e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith("."):
          names.append(e.name)
    paths = [f"{directory}/{n}" for n in sorted(names)]
    stats = list(map(os.stat, paths))
    found[directory] = [(p, st.st_size, st.st_mtime_ns) for p, st in zip(paths, stats)
                        if not stat_lib.S_ISDIR(st.st_mode)]  # links to folders: skipped
  return [f for d in sorted(found) for f in found[d]]


def list_class_tree(root: str, stats: bool = False):
  """(class names, image paths, labels) under root/<class>/**, and with `stats` their
  (size, mtime_ns). One thread: the per-file work is Python-bound, and listing class
  folders in a thread pool measured slower on a 2-core machine."""
  classes = sorted(d for d in os.listdir(root)
                   if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
  per_class = [_class_images(os.path.join(root, c)) for c in classes]
  paths = [p for files in per_class for p, _, _ in files]
  labels = [label for label, files in enumerate(per_class) for _ in files]
  if stats:
    return classes, paths, labels, [st for files in per_class for _, *st in files]
  return classes, paths, labels


@functools.lru_cache(maxsize=8)
def scan(tree: str):
  """(classes, readable paths, labels) of one tree, checked once per process."""
  classes, paths, labels, stats = list_class_tree(tree, stats=True)
  return (classes, *drop_unreadable(paths, labels, tree, stats))


MANIFEST = ".convstem_manifest.json"


def manifest_paths(tree: str) -> list[str]:
  """Where a tree's manifest may live: beside it, else in the user's cache."""
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
  key = hashlib.sha256(os.path.abspath(tree).encode()).hexdigest()[:20]
  return [os.path.join(tree, MANIFEST),
          os.path.join(cache, "convstem_jax", "folders", f"{key}.json")]


def read_manifest(tree: str) -> dict[str, tuple[int, int, bool]]:
  """{path relative to tree: (size, mtime_ns, readable)} ({} if none)."""
  for path in manifest_paths(tree):
    try:
      with open(path, encoding="utf-8") as f:
        m = json.load(f)
      return dict(zip(m["paths"], zip(m["size"], m["mtime_ns"], m["readable"])))
    except (OSError, ValueError, KeyError, TypeError):
      continue
  return {}


def write_manifest(tree: str, entries: dict[str, tuple[int, int, bool]]) -> None:
  """Atomically (a temporary file renamed over the old one), so processes writing at
  once leave one whole manifest; a tree we cannot write to gets the cached one."""
  rels = sorted(entries)
  text = json.dumps({"paths": rels, "size": [entries[r][0] for r in rels],
                     "mtime_ns": [entries[r][1] for r in rels],
                     "readable": [bool(entries[r][2]) for r in rels]})
  for path in manifest_paths(tree):
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
      os.replace(tmp, path)
      return
    except OSError:
      try:
        os.remove(tmp)
      except OSError:
        pass
  logging.warning("Image folder %s: could not write its manifest anywhere; the next start "
                  "checks every image again.", tree)


def drop_unreadable(paths, labels, where: str, stats):
  """The paths (and labels) that decode, checking only files the manifest does not know
  at their current (size, mtime_ns) `stats`."""
  prefix = len(os.path.join(where, ""))
  rels = [p[prefix:] for p in paths]  # paths are listed under `where`
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    known = read_manifest(where)
    verdict = {}
    todo = []
    for rel, path, (size, mtime) in zip(rels, paths, stats):
      entry = known.get(rel)
      if entry is not None and entry[:2] == (size, mtime):
        verdict[rel] = entry[2]
      else:
        todo.append((rel, path))
    for (rel, _), ok in zip(todo, pool.map(_readable, [p for _, p in todo])):
      verdict[rel] = ok
  if todo or set(known) != set(rels):
    logging.info("Image folder %s: decoded %d new or changed file(s) of %d to check them; "
                 "the others were known from the manifest.", where, len(todo), len(paths))
    write_manifest(where, {rel: (*st, verdict[rel]) for rel, st in zip(rels, stats)})
  ok = [verdict[rel] for rel in rels]
  bad = [p for p, good in zip(paths, ok) if not good]
  if bad:
    logging.warning("Image folder %s: skipped %d unreadable or corrupt file(s) of %d: %s%s",
                    where, len(bad), len(paths), ", ".join(bad[:5]),
                    " ..." if len(bad) > 5 else "")
  return ([p for p, good in zip(paths, ok) if good],
          [l for l, good in zip(labels, ok) if good])


def stratified_split(labels, fraction: float, seed: int) -> dict[str, np.ndarray]:
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  test = []
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    test.extend(members[:int(round(fraction * len(members)))].tolist())
  test = np.sort(np.asarray(test, np.int64))
  return {"train": np.setdiff1d(np.arange(len(labels)), test), "test": test}


class FolderSource(FileSource):

  def __init__(self, config, split: str):
    root = config_lib.get(config, "data_dir")
    if not root or not os.path.isdir(root):
      raise errors.MissingInputError(
          f"Image folder '{root}' does not exist; set --config.data_dir to a folder laid "
          f"out as {LAYOUT}.")
    held_out = next((d for d in HELD_OUT if os.path.isdir(os.path.join(root, d))), None)
    split_dirs = os.path.isdir(os.path.join(root, "train")) and held_out is not None
    want = "train" if split == "train" else "test"
    if split not in ("train", *HELD_OUT):
      raise errors.UserError(f"Image folders have splits 'train' and 'test' (or 'val'), not "
                       f"'{split}'.")
    if split_dirs:
      train_classes = list_class_tree(os.path.join(root, "train"))[0]
      tree = os.path.join(root, "train" if want == "train" else held_out)
      classes, paths, labels = scan(tree)
      unknown = set(classes) - set(train_classes)
      if unknown:
        raise errors.UserError(f"Image folder {tree} has classes not in the train folder: "
                         f"{', '.join(sorted(unknown))}.")
      remap = {i: train_classes.index(c) for i, c in enumerate(classes)}
      labels = [remap[l] for l in labels]
      classes = train_classes
    else:  # one tree (root/train alone counts as one tree too)
      tree = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) \
          else root
      classes, paths, labels = scan(tree)
    if not paths:
      raise errors.MissingInputError(f"Image folder '{tree}' holds no images; lay it out as "
                              f"{LAYOUT}.")
    if len(classes) < 2:
      raise errors.UserError(
          f"Image folder {tree} has {len(classes)} class ({', '.join(classes)}); a "
          f"classifier needs at least two class subfolders, laid out as {LAYOUT}.")
    if len(classes) > int(config.num_classes):
      raise errors.UserError(f"Image folder {root} has {len(classes)} classes but "
                       f"config.num_classes is {config.num_classes}; set it to "
                       f"{len(classes)}.")
    if not split_dirs:
      index = stratified_split(labels, float(config_lib.get(config, "folder_test_fraction")),
                               int(config_lib.get(config, "folder_split_seed")))[want]
      paths, labels = list(np.asarray(paths)[index]), list(np.asarray(labels)[index])
    self.classes = classes
    super().__init__(config, split, paths, labels)


def count_classes(root: str) -> int:
  """Classes of an image folder (for configs that size the model from the data)."""
  train = os.path.join(root, "train")
  return len(list_class_tree(train if os.path.isdir(train) else root)[0])
