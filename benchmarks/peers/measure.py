"""Timing, memory and machine facts shared by the peer scripts and `run.py` (standard library only).

Every peer script times its forward pass with `time_runs`, builds its record
with `record` and prints it as ONE JSON line with `emit`, so all rows of a
comparison share the same semantics:

  median_ms      median over `iters` timed runs of one batch, after `warmup`
                 untimed runs (and after any compilation, which is not timed)
  ms_per_image   median_ms / batch
  peak_rss_mib   the process's peak resident set over its whole life (model
                 build, export or compilation included): what a user needs free
  allocator      the malloc in use ('glibc' unless LD_PRELOAD names another);
                 PyTorch's CPU speed depends on it, so every row says which
"""

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import time

# /proc/cpuinfo flags that decide which int8 / bfloat16 kernels the runtimes can use.
CPU_FLAGS = ('avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_bf16', 'amx_int8', 'amx_tile')


def cpu_description():
  """{'model': lscpu's 'Model name', 'flags': [the CPU_FLAGS present], 'nproc': cores we may use}."""
  model = ''
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, timeout=10).stdout
    model = next((line.split(':', 1)[1].strip() for line in out.splitlines()
                  if line.startswith('Model name')), '')
  except (OSError, subprocess.SubprocessError):
    pass
  flags = set()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('flags'):
          flags = set(line.split(':', 1)[1].split())
          break
      if not model:  # lscpu missing: cpuinfo names the model too
        f.seek(0)
        model = next((line.split(':', 1)[1].strip() for line in f
                      if line.startswith('model name')), '')
  except OSError:
    pass
  return {'model': model or platform.processor() or 'unknown',
          'flags': [flag for flag in CPU_FLAGS if flag in flags],
          'nproc': len(os.sched_getaffinity(0))}


def peak_rss_mib():
  """Peak resident set of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def allocator():
  """'glibc', or the preloaded malloc's name (tcmalloc, jemalloc, mimalloc)."""
  preload = os.environ.get('LD_PRELOAD', '')
  return next((name for name in ('tcmalloc', 'jemalloc', 'mimalloc') if name in preload), 'glibc')


def time_runs(fn, warmup, iters):
  """Calls fn() `warmup` times, then times `iters` calls; returns their durations in ms.

  fn must return only when its result is computed (all these runtimes are synchronous on a CPU).
  """
  if iters < 1 or warmup < 0:
    raise ValueError(f'need iters >= 1 and warmup >= 0, got {iters} and {warmup}')
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append((time.perf_counter() - start) * 1000)
  return times


def record(peer, variant, batch, height, width, times_ms, threads, **extra):
  """The JSON record of one run: the fields `run.py` reads, then `extra` (framework, ...)."""
  median = statistics.median(times_ms)
  return {
      'peer': peer, 'variant': variant, 'batch': batch, 'height': height, 'width': width,
      'median_ms': round(median, 3),
      'ms_per_image': round(median / batch, 3),
      'min_ms': round(min(times_ms), 3),
      'max_ms': round(max(times_ms), 3),
      'iters': len(times_ms),
      'peak_rss_mib': round(peak_rss_mib(), 1),
      'threads': threads,
      'allocator': allocator(),
      'python': platform.python_version(),
      'date_utc': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'),
      **extra,
  }


def emit(rec):
  """Prints the record as the one JSON line `run.py` reads (the last line starting with '{')."""
  print(json.dumps(rec), flush=True)


def add_common_args(parser):
  """The flags every peer script takes, with run.py's meaning."""
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--height', type=int, default=513)
  parser.add_argument('--width', type=int, default=513)
  parser.add_argument('--warmup', type=int, default=3, help='untimed runs before timing')
  parser.add_argument('--iters', type=int, default=10, help='timed runs (the median is reported)')
  parser.add_argument('--threads', type=int, default=2, help='intra-op threads')
  return parser
