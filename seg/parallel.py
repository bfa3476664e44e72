"""Devices and processes: the pmap axis, batch sharding, state replication, `jax.distributed`."""

import os
import re
from typing import Any, Dict, Iterator, List, NamedTuple, Optional

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


def prefetch_to_device(batches: Iterator[Any], size: int = 2) -> Iterator[Any]:
  """Host batches [n, ...] -> device batches [local_devices, n / local_devices, ...].

  `size` batches are copied to the devices ahead of the one being consumed, so the
  transfer overlaps the running step (flax's `prefetch_to_device`).
  """
  return jax_utils.prefetch_to_device(map(shard, batches), size, axis_name=AXIS_NAME)


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


def local_rows(x: jax.Array) -> np.ndarray:
  """A pmapped output of per-example rows [devices, n, ...] as this process's rows
  [local devices * n, ...], in the order `shard` split them (also under several processes,
  where the global array holds other hosts' rows too)."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards]).reshape((-1,) + x.shape[2:])


class Launch(NamedTuple):
  """How a cluster launcher started this process (`cluster_launch`).

  local_tasks: processes the launcher started on this machine; local_rank: this one's
  index among them. `kind`: 'slurm' or 'ompi'.
  """
  kind: str
  coordinator: str
  num_processes: int
  process_id: int
  local_rank: int
  local_tasks: int


def _tasks_on_this_node(spec: str, node: int) -> int:
  """SLURM's tasks-per-node list ('8(x4)', '2,1(x2)') read at node index `node`."""
  counts = []
  for part in filter(None, spec.split(',')):
    match = re.fullmatch(r'(\d+)(?:\(x(\d+)\))?', part.strip())
    if not match:
      return 0
    counts += [int(match.group(1))] * int(match.group(2) or 1)
  return counts[node] if 0 <= node < len(counts) else 0


def _slurm_coordinator(env) -> str:
  """The first host of the job step, at a port derived from the job id (as JAX derives it)."""
  port = env.get('JAX_COORDINATOR_PORT') or str(
      int(env['SLURM_JOB_ID']) % 2**12 + (65535 - 2**12 + 1))
  nodes = env['SLURM_STEP_NODELIST']
  first = re.split(r'[,\[]', nodes, maxsplit=1)[0]
  if len(first) < len(nodes) and nodes[len(first)] == '[':   # 'node[001-004,7]' -> node001
    first += re.split(r'[,-]', nodes[len(first) + 1:], maxsplit=1)[0].rstrip(']')
  return f'{first}:{port}'


def _ompi_coordinator(env) -> str:
  """The launcher's address in OMPI_MCA_orte_hnp_uri, at a port derived from the job id."""
  uri = env['OMPI_MCA_orte_hnp_uri']
  port = env.get('JAX_COORDINATOR_PORT') or str(
      int(uri.split('.', 1)[0]) // 2**12 % 2**12 + (65535 - 2**12 + 1))
  match = re.search(r'tcp://(.+?)[,:]|tcp6://\[(.+?)[,\]]', uri)
  if match is None:
    raise ValueError(f'cannot read the launcher address from OMPI_MCA_orte_hnp_uri={uri!r}')
  return f'{next(g for g in match.groups() if g)}:{port}'


def cluster_launch(environ=None) -> Optional[Launch]:
  """What SLURM (`srun`) or Open MPI (`mpirun`) says about this process; None outside them."""
  env = os.environ if environ is None else environ
  slurm = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
           'SLURM_LOCALID')
  if all(v in env for v in slurm):
    spec = env.get('SLURM_STEP_TASKS_PER_NODE') or env.get('SLURM_TASKS_PER_NODE', '')
    local_tasks = (_tasks_on_this_node(spec, int(env.get('SLURM_NODEID', 0)))
                   or int(env.get('SLURM_NTASKS_PER_NODE', 0) or 0) or 1)
    return Launch('slurm', _slurm_coordinator(env), int(env['SLURM_NTASKS']), int(env['SLURM_PROCID']),
                  int(env['SLURM_LOCALID']), local_tasks)
  if 'OMPI_MCA_orte_hnp_uri' in env:
    return Launch('ompi', _ompi_coordinator(env), int(env['OMPI_COMM_WORLD_SIZE']),
                  int(env['OMPI_COMM_WORLD_RANK']), int(env.get('OMPI_COMM_WORLD_LOCAL_RANK', 0)),
                  int(env.get('OMPI_COMM_WORLD_LOCAL_SIZE', 1)))
  return None


def local_device_ids(launch: Optional[Launch], environ=None) -> Optional[List[int]]:
  """The accelerators this process should use; None means every one it sees.

  One task per machine: all of them (JAX's own detection would bind the GPU
  numbered SLURM_LOCALID / OMPI_COMM_WORLD_LOCAL_RANK, i.e. GPU 0, alone). Several tasks per
  machine: the one numbered by the local rank, unless the launcher already
  restricted the process to one GPU (`srun --gpus-per-task=1` sets
  CUDA_VISIBLE_DEVICES to one id, and that GPU is then device 0 of this process).
  """
  env = os.environ if environ is None else environ
  if launch is None or launch.local_tasks <= 1:
    return None
  visible = [d for d in env.get('CUDA_VISIBLE_DEVICES', '').split(',') if d.strip()]
  if len(visible) == 1:
    return None
  return [launch.local_rank]


def distributed_arguments(coordinator: str = '', num_processes: Optional[int] = None,
                          process_id: int = -1, environ=None) -> Optional[Dict[str, Any]]:
  """The keyword arguments for `jax.distributed.initialize`, or None for one process.

  Explicit values (flags or JAX_* variables) win; the rest come from a cluster
  launcher (SLURM, Open MPI). JAX's own cluster detection is switched off
  (`cluster_detection_method='deactivate'`), since it would bind one GPU per
  process even with one task per machine; `local_device_ids` says which GPUs
  this process uses instead.
  """
  launch = cluster_launch(environ)
  explicit = bool(coordinator) or (num_processes or 1) > 1
  if not explicit and (launch is None or launch.num_processes <= 1):
    return None
  if explicit and not (coordinator and num_processes and process_id >= 0):
    raise ValueError('multi-host training needs --coordinator, --num-processes and '
                     '--process-id (or their environment variables) together')
  if not explicit:
    coordinator, num_processes, process_id = (launch.coordinator, launch.num_processes,
                                              launch.process_id)
  if not 0 <= process_id < num_processes:
    raise ValueError(f'--process-id {process_id} outside 0..{num_processes - 1}')
  return dict(coordinator_address=coordinator, num_processes=num_processes,
              process_id=process_id, local_device_ids=local_device_ids(launch, environ),
              cluster_detection_method='deactivate')


def initialize_distributed(coordinator: str = '', num_processes: Optional[int] = None,
                           process_id: int = -1) -> None:
  """Joins a multi-host run through `jax.distributed` before JAX's backends start.

  With `coordinator` or `num_processes` > 1: those values (every process
  passes the same coordinator address and process count, its own id). With
  neither: what SLURM or Open MPI says (`distributed_arguments`), else nothing
  (one process). Either way every process uses every GPU it is meant to: all
  of its machine's with one task per machine, its own with one task per GPU.
  After this, `pmap`'s axis spans every device of every process: gradients,
  BatchNorm statistics and metrics are reduced across hosts.
  """
  arguments = distributed_arguments(coordinator, num_processes, process_id)
  if arguments is None:
    return
  # CPU-only hosts need a collectives implementation across processes (ignored on GPUs).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**arguments)


def describe_devices(global_batch: int) -> str:
  """'P process(es) x L local device(s) = G global devices, global batch B = b per device'."""
  processes, local, total = jax.process_count(), jax.local_device_count(), jax.device_count()
  per_device = global_batch / total
  per_device = int(per_device) if per_device == int(per_device) else round(per_device, 2)
  return (f'{processes} process(es) x {local} local device(s) = {total} global device(s) '
          f'({jax.devices()[0].platform}), global batch {global_batch} = {per_device} per device')
