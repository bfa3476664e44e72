"""The command line: `python main.py COMMAND [flags]`, or the `seg` command of `pip install -e .`.

    python main.py --help                  the commands
    python main.py COMMAND --help          that command's flags

`main` parses (`seg.cli.parser`), makes the process-wide settings that must precede JAX
(`seg.cli.process`: allocator, CPU devices, compilation cache, log levels) and calls the
command (`seg.cli.commands`). Nothing heavy is imported before a command runs, so `--help`
and usage errors answer at once.
"""

import os
import sys
from typing import Optional, Sequence

from seg.cli import parser as parser_lib
from seg.cli import process

# Commands that only run the network.
INFERENCE_COMMANDS = ('eval', 'predict', 'benchmark', 'export')


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs one command; returns its exit status (1: an error of the user's, 2: a usage error)."""
  from_command_line = argv is None
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = parser_lib.build_parser()
  args = parser_lib.parse(parser, argv)
  if from_command_line:
    process.reexec_with_mimalloc()
  if args.command in INFERENCE_COMMANDS and not getattr(args, 'train', False):
    process.no_gpu_preallocation()  # they can run beside a training process on one GPU
  if args.command == 'predict' or (args.command == 'benchmark' and not args.train):
    process.split_cpu_into_devices()  # batches computed as two parts at once on a CPU
  if args.command in INFERENCE_COMMANDS:
    process.use_cpu_feature_flags()  # e.g. oneDNN's AMX kernels where the CPU has AMX
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # TF's C++ INFO lines drown the progress
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax and TFDS log every step at INFO
  sys.stdout.reconfigure(line_buffering=True)  # progress shows up at once in logs too
  import jax
  jax.config.update('jax_compilation_cache_dir', process.compilation_cache_dir())
  from seg.cli import commands
  try:
    return commands.run(args)
  except commands.CommandError as e:  # the user's mistake: one clear message, no traceback
    print(f'{parser.prog} {args.command}: error: {e}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:  # what was done is kept; the command said how to resume
    return 130
