"""Process-level settings that must be made before anything else runs.

Imports nothing heavy: `main.py` and the benchmarks call this first thing.
"""

import os
import sys
import sysconfig


def reexec_with_mimalloc() -> None:
  """Restarts this process with mimalloc preloaded, unless SEG_ALLOCATOR=system.

  Under glibc's malloc, XLA's CPU runtime gets fresh pages from the kernel for
  its buffers at every step: half the CPU time went to page faults, and
  mimalloc (pip package cmeel-mimalloc) doubled training images/s here
  (README, "Speed"). Preloading only works from the start of a process.
  """
  if (os.environ.get('SEG_ALLOCATOR', 'mimalloc') != 'mimalloc'
      or 'mimalloc' in os.environ.get('LD_PRELOAD', '')):
    return
  lib = os.path.join(sysconfig.get_paths()['purelib'], 'cmeel.prefix', 'lib', 'libmimalloc.so')
  if os.path.exists(lib):
    preload = ':'.join(filter(None, [lib, os.environ.get('LD_PRELOAD')]))
    os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, LD_PRELOAD=preload))
