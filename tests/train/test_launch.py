"""Launching under SLURM and Open MPI: the arguments given to `jax.distributed.initialize`
(simulated environments), the start-up line, and the shared-workdir check (two processes)."""

import os
import socket
import subprocess
import sys

import jax
import pytest

from seg import checkpoint, parallel

HERE = os.path.dirname(os.path.abspath(__file__))


def slurm(procid, localid, nodeid, ntasks, tasks_per_node, nodes='gpu[017-020]', **extra):
  """The variables `srun` sets in a task (job 1234), as strings."""
  env = {'SLURM_JOB_ID': '1234', 'SLURM_STEP_NODELIST': nodes, 'SLURM_NTASKS': str(ntasks),
         'SLURM_PROCID': str(procid), 'SLURM_LOCALID': str(localid),
         'SLURM_NODEID': str(nodeid), 'SLURM_STEP_TASKS_PER_NODE': tasks_per_node}
  env.update(extra)
  return env


OMPI_URI = '1531576320.0;tcp://10.96.0.1,10.148.0.1,10.108.0.1:34911'


def test_slurm_one_task_per_node_uses_every_gpu():
  args = parallel.distributed_arguments(environ=slurm(2, 0, 2, 4, '1(x4)'))
  # Port: JAX's rule, job id % 4096 in the top 4096 ports: 1234 + 61440.
  assert args == dict(coordinator_address='gpu017:62674', num_processes=4, process_id=2,
                      local_device_ids=None, cluster_detection_method='deactivate')


def test_slurm_one_task_per_gpu_binds_its_own_gpu():
  env = slurm(13, 5, 1, 32, '8(x4)')
  args = parallel.distributed_arguments(environ=env)
  assert (args['num_processes'], args['process_id'], args['local_device_ids']) == (32, 13, [5])
  # srun --gpus-per-task=1 already shows the task one GPU: it is that process's device 0.
  args = parallel.distributed_arguments(environ=dict(env, CUDA_VISIBLE_DEVICES='5'))
  assert args['local_device_ids'] is None


def test_slurm_uneven_tasks_per_node():
  # '2,1(x2)': node 0 runs 2 tasks, nodes 1 and 2 one each.
  assert parallel.distributed_arguments(
      environ=slurm(1, 1, 0, 4, '2,1(x2)'))['local_device_ids'] == [1]
  assert parallel.distributed_arguments(
      environ=slurm(3, 0, 2, 4, '2,1(x2)'))['local_device_ids'] is None


def test_explicit_flags_under_slurm_still_use_every_gpu():
  """The trap of the issue: JAX binds GPU SLURM_LOCALID also when all three values are given."""
  args = parallel.distributed_arguments('host0:1234', 4, 3, environ=slurm(3, 0, 3, 4, '1(x4)'))
  assert args == dict(coordinator_address='host0:1234', num_processes=4, process_id=3,
                      local_device_ids=None, cluster_detection_method='deactivate')


def test_jax_own_detection_binds_one_gpu(monkeypatch):
  """What `cluster_detection_method='deactivate'` avoids, read from JAX itself."""
  from jax._src import clusters
  env = slurm(2, 0, 2, 4, '1(x4)')
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  coordinator, count, pid, local = clusters.ClusterEnv.auto_detect_unset_distributed_params(
      'host0:1234', 4, 2, None, None, 10)
  assert local == [0]   # one GPU of eight
  # And its coordinator address is ours, for each form of node list.
  for nodes, host in (('gpu017', 'gpu017'), ('gpu017,cpu2', 'gpu017'),
                      ('gpu[017-020]', 'gpu017'), ('gpu[003,007-015],cpu2', 'gpu003')):
    monkeypatch.setenv('SLURM_STEP_NODELIST', nodes)
    theirs = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, 10)[0]
    ours = parallel.distributed_arguments(environ=dict(env, SLURM_STEP_NODELIST=nodes))
    assert ours['coordinator_address'] == theirs == f'{host}:62674'


def test_open_mpi():
  env = {'OMPI_MCA_orte_hnp_uri': OMPI_URI, 'OMPI_COMM_WORLD_SIZE': '16',
         'OMPI_COMM_WORLD_RANK': '9', 'OMPI_COMM_WORLD_LOCAL_RANK': '1',
         'OMPI_COMM_WORLD_LOCAL_SIZE': '8'}
  args = parallel.distributed_arguments(environ=env)
  # Port: (1531576320 // 4096) % 4096 + 61440 = 1184 + 61440.
  assert args == dict(coordinator_address='10.96.0.1:62624', num_processes=16, process_id=9,
                      local_device_ids=[1], cluster_detection_method='deactivate')
  one_per_node = dict(env, OMPI_COMM_WORLD_LOCAL_SIZE='1', OMPI_COMM_WORLD_LOCAL_RANK='0')
  assert parallel.distributed_arguments(environ=one_per_node)['local_device_ids'] is None


def test_one_process_and_errors():
  assert parallel.distributed_arguments(environ={}) is None
  assert parallel.distributed_arguments(environ=slurm(0, 0, 0, 1, '1')) is None
  with pytest.raises(ValueError, match='together'):
    parallel.distributed_arguments('host0:1234', environ={})
  with pytest.raises(ValueError, match='outside'):
    parallel.distributed_arguments('host0:1234', 2, 2, environ={})


def test_initialize_distributed_passes_them_to_jax(monkeypatch):
  calls, updates = [], []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.config, 'update', lambda *a: updates.append(a))
  for key in list(os.environ):
    if key.startswith(('SLURM_', 'OMPI_', 'CUDA_VISIBLE')):
      monkeypatch.delenv(key)
  parallel.initialize_distributed()
  assert calls == []
  for key, value in slurm(9, 1, 1, 32, '8(x4)').items():
    monkeypatch.setenv(key, value)
  parallel.initialize_distributed()
  assert calls == [dict(coordinator_address='gpu017:62674', num_processes=32, process_id=9,
                        local_device_ids=[1], cluster_detection_method='deactivate')]
  assert ('jax_cpu_collectives_implementation', 'gloo') in updates


def test_start_up_line():
  assert jax.device_count() == 4
  assert parallel.describe_devices(8) == (
      '1 process(es) x 4 local device(s) = 4 global device(s) (cpu), '
      'global batch 8 = 2 per device')


def test_marker_read_from_same_folder_only(tmp_path):
  shared, other = tmp_path / 'shared', tmp_path / 'other'
  checkpoint.write_marker(str(shared), 41)
  assert checkpoint.marker_seen(str(shared), 41, timeout=0)
  assert not checkpoint.marker_seen(str(shared), 42, timeout=0.3, poll=0.1)  # a stale marker
  assert not checkpoint.marker_seen(str(other), 41, timeout=0.3, poll=0.1)


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_shared_and_unshared_workdir(tmp_path):
  """Two processes: one folder passes; a folder per process stops both with the error."""
  coordinator = f'localhost:{_free_port()}'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             JAX_PLATFORMS='cpu')
  workers = [subprocess.Popen(
      [sys.executable, os.path.join(HERE, 'shared_workdir_worker.py'), coordinator, str(i),
       str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  try:
    outputs = [w.communicate(timeout=180)[0] for w in workers]
  finally:
    for w in workers:
      w.kill()
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output[-3000:]
    assert 'shared: ok' in output, output[-3000:]
    assert 'unshared: WorkdirNotShared: --workdir' in output, output[-3000:]
    assert 'process(es) [1] did not see' in output, output[-3000:]
