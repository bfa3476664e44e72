"""Devices and processes: the pmap axis, batch sharding, state replication, `jax.distributed`."""

import os
from typing import Any, Optional

import jax
import numpy as np
from flax import jax_utils

AXIS_NAME = 'batch'  # the one pmap axis: gradients, BatchNorm statistics, metrics


def local_batch_size(global_batch: int) -> int:
  """This process's share of a global batch; a clear error when it does not divide."""
  processes, devices = jax.process_count(), jax.local_device_count()
  if global_batch % (processes * devices):
    raise ValueError(
        f'global batch size {global_batch} does not divide across {processes} process(es) x '
        f'{devices} local device(s); choose a multiple of {processes * devices}')
  return global_batch // processes


def shard(batch: Any) -> Any:
  """[n, ...] host arrays -> [local_devices, n / local_devices, ...]."""
  devices = jax.local_device_count()
  return jax.tree.map(lambda x: np.reshape(x, (devices, -1) + x.shape[1:]), batch)


def replicate(tree: Any) -> Any:
  """Copies a host pytree onto every local device (leading device axis).

  The copies are passed through an identity pmap over `AXIS_NAME`: placed by
  `jax_utils.replicate` alone they carry another mesh axis name than the pmapped
  steps' outputs, and the second call of a step (fed its own outputs) compiled
  the whole step again (18 s for the tiny config's train step here).
  """
  return _pmap_identity(jax_utils.replicate(tree))


_pmap_identity = jax.pmap(lambda x: x, axis_name=AXIS_NAME)


def unreplicate(tree: Any) -> Any:
  """This process's first local device's copy, fetched to the host.

  Not `x[0]`: under several processes a pmapped output is a global array, and
  indexing it would gather from another host's device.
  """
  def first(x):
    if isinstance(x, jax.Array):   # a device's shard keeps the device axis (length 1)
      return np.asarray(x.addressable_data(0)).reshape(x.shape[1:])
    return np.asarray(x[0])
  return jax.tree.map(first, tree)


def initialize_distributed(coordinator: str = '', num_processes: Optional[int] = None,
                           process_id: int = -1) -> None:
  """Joins a multi-host run through `jax.distributed` before JAX's backends start.

  With `coordinator` or `num_processes` > 1: those values (every process
  passes the same coordinator address and process count, its own id). With
  neither: JAX's own cluster detection where a cluster launched this process
  (SLURM, Open MPI), else nothing (one process). After this, `pmap`'s axis
  spans every device of every process: gradients, BatchNorm statistics and
  metrics are reduced across hosts.
  """
  multi = bool(coordinator) or (num_processes or 1) > 1
  in_cluster = any(int(os.environ.get(v, '1') or 1) > 1
                   for v in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'))
  if not multi and not in_cluster:
    return
  if multi and not (coordinator and num_processes and process_id >= 0):
    raise ValueError('multi-host training needs --coordinator, --num-processes and '
                     '--process-id (or their environment variables) together')
  # CPU-only hosts need a collectives implementation across processes (ignored on GPUs).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if multi:
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process-id {process_id} outside 0..{num_processes - 1}')
    jax.distributed.initialize(coordinator, num_processes, process_id)
  else:
    jax.distributed.initialize()
