"""Where it runs: the device mesh, parameter shardings and global input arrays.

The mesh has one `data` axis by default (every device, every host). Batches are split
along it. Parameters and optimizer state are replicated, or, with `config.fsdp`, each
array is split along its largest dimension that the axis size divides (small arrays
stay replicated), so memory per device falls with the device count. Everything is a
global `jax.Array`, which is what lets orbax save from every host and restore onto any
topology.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from convstem_jax import config as config_lib
from convstem_jax import errors

DATA = "data"
# Arrays smaller than this stay replicated under fsdp: splitting them saves nothing.
FSDP_MIN_SIZE = 2 ** 14


def cpu_device_count(requested: int, batch_sizes: Sequence[int], cores: int) -> int:
  """`requested` CPU devices (0 = one per core), lowered to the largest count that every
  batch in `batch_sizes` splits over evenly (a prime batch gets one device)."""
  n = max(1, requested or cores)
  while n > 1 and any(b % n for b in batch_sizes):
    n -= 1
  return n


def configure_cpu_devices(config, cores: int | None = None) -> int | None:
  """Sets how many devices JAX's CPU backend has, before any backend starts.

  XLA:CPU runs most of one device's step on one core (its matmuls use more; its
  elementwise fusions and convolutions mostly do not), so on a CPU host the trainer
  takes one device per core and lets the data-parallel split use them all: the README
  main job's step ran about 1.3x faster on the 2-core AMD EPYC VM (docs/benchmarks.md).
  Numerics are those of one device up to float rounding (BatchNorm statistics are still
  over the global batch). It sizes only the CPU backend, which a GPU or TPU run does not
  compute on (not tried on one here). A device count already given in XLA_FLAGS
  (--xla_force_host_platform_device_count) or JAX_NUM_CPU_DEVICES wins. `cores`
  defaults to the cores this process may run on. Returns the count set, or None where
  it left JAX's choice.
  """
  if ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
      or os.environ.get("JAX_NUM_CPU_DEVICES")):
    return None
  from convstem_jax.data import files  # pylint: disable=g-import-not-at-top
  accum = max(1, int(config_lib.get(config, "grad_accum_steps")))
  sizes = [config.batch_size // accum, config_lib.get(config, "eval_batch_size")]
  n = cpu_device_count(int(config_lib.get(config, "cpu_devices")), sizes,
                       cores or files.cores())
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:  # a caller in this process already started JAX: keep its devices
    return None
  return n


def make_mesh(axes: Sequence[tuple[str, int]] = ((DATA, -1),)) -> Mesh:
  """A mesh from [(name, size)], one size may be -1 (the rest of the devices).

  Only the `data` axis is implemented (batches split over it, and weights too with
  config.fsdp); any other axis is refused rather than silently used as more data
  parallelism.
  """
  try:
    names = [str(a) for a, _ in axes]
    sizes = [int(s) for _, s in axes]
  except (TypeError, ValueError):
    raise errors.UserError(f"config.mesh {axes!r} is not a list of (axis name, size) "
                           "pairs; use (('data', -1),).") from None
  other = [a for a in names if a != DATA]
  if other or not names:
    raise errors.UserError(
        f"config.mesh {list(axes)} has axis {other[0] if other else 'none'!r}, which this "
        f"trainer does not implement; use (('{DATA}', -1),) and --config.fsdp=True to "
        "shard the weights.")
  n = jax.device_count()
  if sizes.count(-1) > 1:
    raise errors.UserError(f"config.mesh {list(axes)} has more than one -1 axis; give all but "
                     "one axis an explicit size.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n % known:
      raise errors.UserError(f"config.mesh {list(axes)} does not fit {n} devices; the explicit "
                       f"axis sizes must divide the device count.")
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    raise errors.UserError(f"config.mesh {list(axes)} needs {int(np.prod(sizes))} devices but "
                     f"{n} are present; use -1 for the data axis.")
  auto = (jax.sharding.AxisType.Auto,) * len(names)
  return jax.make_mesh(tuple(sizes), tuple(names), axis_types=auto)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over every mesh axis."""
  return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], axis_size: int) -> P:
  if np.prod(shape, dtype=np.int64) < FSDP_MIN_SIZE:
    return P()
  for dim in np.argsort(shape)[::-1]:  # largest dimension first
    if shape[dim] % axis_size == 0:
      spec = [None] * len(shape)
      spec[dim] = DATA
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp: bool = False) -> Any:
  """Shardings for a pytree of ShapeDtypeStructs: replicated, or fsdp along `data`."""
  def rule(x):
    if not fsdp or not hasattr(x, "shape"):
      return replicated(mesh)
    return NamedSharding(mesh, fsdp_spec(x.shape, mesh.shape[DATA]))
  return jax.tree.map(rule, abstract_state)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of the batch -> one global array per key (no gather)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def local_batch_size(global_batch_size: int) -> int:
  """Examples this process feeds per step; the batch must split evenly over devices."""
  n, hosts = jax.device_count(), jax.process_count()
  if global_batch_size <= 0:
    raise errors.UserError(f"Batch size {global_batch_size} must be positive; use a "
                           f"multiple of the {n} devices (--config.batch_size=...).")
  if global_batch_size % n:
    raise errors.UserError(f"Batch size {global_batch_size} is not divisible by the {n} "
                     f"devices; use a multiple of {n} (--config.batch_size=...).")
  return global_batch_size // hosts
