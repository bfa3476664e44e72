"""Splitting host batches across local devices and replicating state for `jax.pmap`."""

from typing import Any

import jax
import numpy as np
from flax import jax_utils


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
  """Copies a host pytree onto every local device (leading device axis)."""
  return jax_utils.replicate(tree)


def unreplicate(tree: Any) -> Any:
  """The first device's copy, fetched to the host."""
  return jax.device_get(jax.tree.map(lambda x: x[0], tree))
