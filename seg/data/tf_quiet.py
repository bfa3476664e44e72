"""TensorFlow, imported without the start-up lines its C++ library writes to stderr.

`import tensorflow` (2.21) writes, twice, "WARNING: All log messages before
absl::InitializeLog() is called are written to STDERR" and "I0000 ... port.cc] oneDNN custom
operations are on. ..." straight to file descriptor 2, whatever TF_CPP_MIN_LOG_LEVEL says:
four lines of noise at the start of every `train`, `eval` and `prepare-data`. The data layer
imports TensorFlow through here (`from seg.data.tf_quiet import tf`); everything else written
to stderr during the import is passed on unchanged once it is done. `filtered_stderr` does
the same for the LiteRT converter's lines.
"""

import contextlib
import importlib
import os
import sys
import tempfile

# Lines holding one of these, and only these, are dropped: TensorFlow's start-up lines, and
# those its LiteRT converter writes at every conversion (`seg.export.tflite`).
NOISE = (b'All log messages before absl::InitializeLog() is called',
         b'oneDNN custom operations are on',
         b'Ignored output_format.', b'Ignored drop_control_dependency.',
         b'fully_quantize: 0, inference_type: ',
         b'Skipping runtime version metadata in the model.')


@contextlib.contextmanager
def filtered_stderr(noise=NOISE):
  """What is written to stderr (file descriptor 2) in the block, less the `noise` lines.

  Held in a temporary file and passed on when the block ends (a pipe could fill and block
  a C++ writer that holds the GIL): a process that dies inside the block loses its lines.
  """
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, AttributeError, ValueError):  # no stderr (closed, or None): nothing to filter
    yield
    return
  try:
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
