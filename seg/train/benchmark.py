"""Training speed: the pmapped step fed from memory, then by the real input pipeline.

    python main.py benchmark --train --config experiments/quickstart.py [--steps 30]

The gap between the two figures is what the input pipeline costs.
"""

import os
import resource
import time
from typing import Dict

WARMUP_STEPS = 5


def _cpu_seconds():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime, usage.ru_stime


def measure_train_speed(config, steps: int = 30) -> Dict:
  """Times `steps` training steps per phase, after WARMUP_STEPS untimed ones.

  Phases: 'in_memory' (one host batch, sharded again at every step) and
  'pipeline' (`seg.data.pipeline.train_batches`, two batches prefetched to the
  devices, as the training loop feeds them), with `input_wait_fraction`, the
  share of the wall time spent waiting for the next batch; then 'input_only'
  (the same number of batches from the pipeline, no step), with the pipeline's
  examples per second and per CPU core (examples / process CPU seconds).

  Returns devices, global batch, crop, compute dtype, transfer dtype and, per
  phase, images/s in all and per device, wall and process CPU seconds.
  """
  import jax
  from seg import parallel
  from seg.data import pipeline
  from seg.model import create_model
  from seg.train import step
  lr = step.create_learning_rate_fn(config.train)
  state = parallel.replicate(step.create_train_state(
      jax.random.key(0), config, create_model(config.model), lr))
  p_step = step.make_p_train_step(config, lr)
  from seg.train.loop import TimedBatches, transfers_uint8
  as_uint8 = transfers_uint8(config.data.transfer)
  host_batches = pipeline.train_batches(config.data, parallel.local_batch_size(
      config.train.batch_size), config.train.seed, jax.process_index(), jax.process_count(),
      as_uint8=as_uint8)
  rng = parallel.replicate(jax.random.key(0))
  fixed = next(host_batches)
  fed = TimedBatches(parallel.prefetch_to_device(host_batches, 2))
  devices = jax.device_count()
  result = {'devices': devices, 'device_kind': jax.devices()[0].device_kind,
            'global_batch': config.train.batch_size, 'crop': config.data.crop_size,
            'compute_dtype': config.train.compute_dtype,
            'transfer': 'uint8' if as_uint8 else 'float32', 'cpu_cores': os.cpu_count()}
  for phase, get in (('in_memory', lambda: parallel.shard(fixed)), ('pipeline', lambda: next(fed))):
    for _ in range(WARMUP_STEPS):
      state, metrics = p_step(state, get(), rng)
    jax.block_until_ready(metrics)
    (u0, s0), t0, waited = _cpu_seconds(), time.perf_counter(), fed.waited
    for _ in range(steps):
      state, metrics = p_step(state, get(), rng)
    jax.block_until_ready(metrics)
    (u1, s1), seconds = _cpu_seconds(), time.perf_counter() - t0
    rate = steps * config.train.batch_size / seconds
    result[phase] = {'images_per_s': round(rate, 1),
                     'images_per_s_per_device': round(rate / devices, 1),
                     'wall_s': round(seconds, 1), 'cpu_user_s': round(u1 - u0, 1),
                     'cpu_sys_s': round(s1 - s0, 1)}
    if phase == 'pipeline':
      result[phase]['input_wait_fraction'] = round((fed.waited - waited) / seconds, 3)
  # The pipeline alone: what it delivers, and per core of CPU time it burns.
  examples = steps * parallel.local_batch_size(config.train.batch_size)
  (u0, s0), t0 = _cpu_seconds(), time.perf_counter()
  for _ in range(steps):
    next(host_batches)
  (u1, s1), seconds = _cpu_seconds(), time.perf_counter() - t0
  cpu = (u1 - u0) + (s1 - s0)
  result['input_only'] = {'examples_per_s': round(examples / seconds, 1),
                          'examples_per_cpu_core_s': round(examples / max(cpu, 1e-9), 1),
                          'wall_s': round(seconds, 1), 'cpu_user_s': round(u1 - u0, 1),
                          'cpu_sys_s': round(s1 - s0, 1)}
  return result


def run_train_benchmark(config, steps: int = 30, log=print) -> Dict:
  """`main.py benchmark --train`: measures, prints a short table, returns the figures."""
  log(f'training benchmark: {steps} timed steps per phase, global batch '
      f'{config.train.batch_size} at {config.data.crop_size}x{config.data.crop_size}, '
      f'compute {config.train.compute_dtype} ...')
  result = measure_train_speed(config, steps)
  log(f'{result["devices"]} device(s) ({result["device_kind"]})')
  log(f'{"batches":<12} {"img/s":>8} {"img/s/device":>13} {"wall s":>7} {"cpu user/sys s":>15}')
  for phase in ('in_memory', 'pipeline'):
    r = result[phase]
    log(f'{phase:<12} {r["images_per_s"]:>8} {r["images_per_s_per_device"]:>13} '
        f'{r["wall_s"]:>7} {r["cpu_user_s"]:>7} / {r["cpu_sys_s"]}')
  log(f'input wait: {100 * result["pipeline"]["input_wait_fraction"]:.0f}% of the pipeline '
      f'phase\'s time ({result["transfer"]} crops, 2 batches prefetched to the devices)')
  r = result['input_only']
  log(f'input pipeline alone: {r["examples_per_s"]} examples/s, '
      f'{r["examples_per_cpu_core_s"]} examples/s per CPU core '
      f'({r["cpu_user_s"]} + {r["cpu_sys_s"]} CPU s in {r["wall_s"]} s, '
      f'{result["cpu_cores"]} cores)')
  return result
