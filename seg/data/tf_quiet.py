"""TensorFlow, imported without the start-up lines its C++ library writes to stderr.

`import tensorflow` (2.21) writes, twice, "WARNING: All log messages before
absl::InitializeLog() is called are written to STDERR" and "I0000 ... port.cc] oneDNN custom
operations are on. ..." straight to file descriptor 2, whatever TF_CPP_MIN_LOG_LEVEL says:
four lines of noise at the start of every `train`, `eval` and `prepare-data`. The data layer
imports TensorFlow through here (`from seg.data.tf_quiet import tf`); everything else written
to stderr during the import is passed on unchanged once it is done.
"""

import importlib
import os
import sys
import tempfile

# Lines holding one of these, and only these, are dropped.
NOISE = (b'All log messages before absl::InitializeLog() is called',
         b'oneDNN custom operations are on')


def quiet_import(name: str):
  """Imports module `name` with the NOISE lines it writes to stderr left out."""
  if name in sys.modules:
    return sys.modules[name]
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with tempfile.TemporaryFile() as captured:
      os.dup2(captured.fileno(), 2)
      try:
        return importlib.import_module(name)
      finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        captured.seek(0)
        kept = b''.join(line for line in captured.read().splitlines(keepends=True)
                        if not any(noise in line for noise in NOISE))
        while kept:
          kept = kept[os.write(2, kept):]
  finally:
    os.close(saved)


tf = quiet_import('tensorflow')
