"""Process-level settings that must be made before anything else runs (allocator, devices, caches).

Imports nothing heavy: the CLI and the benchmark scripts call this first thing.
"""

import os
import sys
import sysconfig


def reexec_with_mimalloc() -> None:
  """Restarts this process with mimalloc preloaded, unless SEG_ALLOCATOR=system.

  Under glibc's malloc, XLA's CPU runtime gets fresh pages from the kernel for
  its buffers at every step, and page faults take much of the CPU time; mimalloc
  (pip package cmeel-mimalloc) keeps them (docs/performance.md). Preloading only
  works from the start of a process. Its default purge delay (10 ms) stays: purging at
  once (MIMALLOC_PURGE_DELAY=0, the inference commands' setting until 2026-12-06) cost
  ~0.5 ms per 513x513 image at batch 1 in int8 in page faults, for ~20 MiB less peak
  memory (docs/performance.md, "The allocator").
  """
  if (os.environ.get('SEG_ALLOCATOR', 'mimalloc') != 'mimalloc'
      or 'mimalloc' in os.environ.get('LD_PRELOAD', '')):
    return
  lib = os.path.join(sysconfig.get_paths()['purelib'], 'cmeel.prefix', 'lib', 'libmimalloc.so')
  if os.path.exists(lib):
    preload = ':'.join(filter(None, [lib, os.environ.get('LD_PRELOAD')]))
    os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, LD_PRELOAD=preload))


def compilation_cache_dir() -> str:
  """Where JAX's persistent compilation cache lives for this project's commands.

  JAX_COMPILATION_CACHE_DIR when set (JAX's own variable), else
  $XDG_CACHE_HOME/seg/jax (~/.cache/seg/jax): per user, so that two users of one
  machine do not share, or fail to write, one folder.
  """
  chosen = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  if chosen:
    return chosen
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'seg', 'jax')


def no_gpu_preallocation() -> None:
  """Inference commands take GPU memory as they need it, not 75% of it at start.

  JAX preallocates 75% of each GPU's memory by default (XLA_PYTHON_CLIENT_PREALLOCATE);
  `eval`, `predict`, `benchmark` and `export` then could not run beside a training process
  on the same GPU. A value the user set is kept (e.g. XLA_PYTHON_CLIENT_MEM_FRACTION for a
  bounded pool). Must run before JAX starts; no effect on a CPU.
  """
  if not any(v in os.environ for v in ('XLA_PYTHON_CLIENT_PREALLOCATE',
                                       'XLA_PYTHON_CLIENT_MEM_FRACTION',
                                       'XLA_PYTHON_CLIENT_ALLOCATOR')):
    os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'


def split_cpu_into_devices(count: int = 2) -> None:
  """Shows the CPU to XLA as `count` devices, unless XLA_FLAGS already sets a number.

  For `predict` and `benchmark`: the engine then computes a batch as `count` parts
  at once (`seg.inference.engine.Engine.run_padded`), which keeps both cores of a
  2-core machine busy in the program's single-threaded stretches (docs/performance.md).
  Never more devices than CPUs. Must run before JAX starts; accelerators are unaffected.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if '--xla_force_host_platform_device_count' not in flags:
    count = max(1, min(count, os.cpu_count() or 1))
    os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={count}'.strip()


def use_cpu_feature_flags() -> None:
  """Adds the XLA flags that suit this CPU's features (`seg.inference.cpu_features.choose`:
  oneDNN on AMX CPUs, none elsewhere) to XLA_FLAGS, unless XLA_FLAGS names them already.

  For the inference commands. Must run before JAX starts.
  """
  from seg.inference import cpu_features
  flags = os.environ.get('XLA_FLAGS', '')
  for flag in cpu_features.choose().xla_flags:
    if flag.split('=')[0] not in flags:
      flags = f'{flags} {flag}'.strip()
  if flags:
    os.environ['XLA_FLAGS'] = flags
