"""TensorFlow, imported without the start-up lines its C++ library writes to stderr.

`import tensorflow` (2.21) writes, twice, "WARNING: All log messages before
absl::InitializeLog() is called are written to STDERR" and "I0000 ... port.cc] oneDNN custom
operations are on. ..." straight to file descriptor 2, whatever TF_CPP_MIN_LOG_LEVEL says:
four lines of noise at the start of every `train`, `eval` and `prepare-data`. The data layer
imports TensorFlow through here (`from seg.data.tf_quiet import tf`); everything else written
to stderr during the import is passed on unchanged, as it comes, even by a process that dies
there (`filtered_stderr`), which does the same for the LiteRT converter's lines.
"""

import contextlib
import importlib
import os
import subprocess
import sys
import tempfile
from typing import Tuple

# Lines holding one of these, and only these, are dropped: TensorFlow's start-up lines, and
# those its LiteRT converter writes at every conversion (`seg.export.tflite`).
NOISE = (b'All log messages before absl::InitializeLog() is called',
         b'oneDNN custom operations are on',
         b'Ignored output_format.', b'Ignored drop_control_dependency.',
         b'fully_quantize: 0, inference_type: ',
         b'Skipping runtime version metadata in the model.')


# The forwarding process (`_forwarder`): stdin's lines to stdout, less those holding a noise
# string (argv), each passed on as it comes.
_FILTER = r'''
import sys
noise = [n.encode() for n in sys.argv[1:]]
out = sys.stdout.buffer
for line in sys.stdin.buffer:
  if not any(n in line for n in noise):
    out.write(line)
    out.flush()
'''
FORWARDER_WAIT = 10.0  # seconds to wait for the forwarder's last lines (a writer may live on)


def _forwarder(target: int, noise) -> Tuple[subprocess.Popen, int]:
  """(a child process copying the lines written to a new pipe to file descriptor `target`,
  less the `noise` lines, the pipe's write end)."""
  read, write = os.pipe()
  try:
    child = subprocess.Popen([sys.executable, '-I', '-S', '-c', _FILTER,
                              *[n.decode('latin-1') for n in noise]],
                             stdin=read, stdout=target, stderr=subprocess.DEVNULL)
  except BaseException:
    os.close(write)
    raise
  finally:
    os.close(read)
  return child, write


@contextlib.contextmanager
def filtered_stderr(noise=NOISE):
  """What is written to stderr (file descriptor 2) in the block, less the `noise` lines.

  A child process (`_forwarder`) passes each line on as it comes, and the block's end waits
  for the last ones: a process that dies in the block (TensorFlow's import aborting, or a CPU
  it was not built for) still shows what it wrote. Where no child can be started, the lines
  are held in a temporary file and passed on when the block ends (a pipe read by a thread of
  this process could fill and block a C++ writer that holds the GIL); then a process that
  dies in the block loses them.
  """
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, AttributeError, ValueError):  # no stderr (closed, or None): nothing to filter
    yield
    return
  try:
    try:
      child, write = _forwarder(saved, noise)
    except (OSError, ValueError):  # no interpreter to start: hold the lines in a file
      child = None
    if child is not None:
      os.dup2(write, 2)
      os.close(write)
      try:
        yield
      finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's write end closed: the child reads to its end and exits
        try:
          child.wait(FORWARDER_WAIT)
        except subprocess.TimeoutExpired:  # a process started in the block holds the pipe
          pass
      return
    with tempfile.TemporaryFile() as captured:
      os.dup2(captured.fileno(), 2)
      try:
        yield
      finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        captured.seek(0)
        kept = b''.join(line for line in captured.read().splitlines(keepends=True)
                        if not any(n in line for n in noise))
        while kept:
          kept = kept[os.write(2, kept):]
  finally:
    os.close(saved)


def quiet_import(name: str):
  """Imports module `name` with the NOISE lines it writes to stderr left out."""
  if name in sys.modules:
    return sys.modules[name]
  with filtered_stderr():
    return importlib.import_module(name)


tf = quiet_import('tensorflow')
