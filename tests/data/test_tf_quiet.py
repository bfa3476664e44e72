"""TensorFlow's start-up lines are left out of stderr; everything else written there is kept."""

import os
import subprocess
import sys

from helpers import ROOT
from seg.data import tf_quiet


def test_quiet_import_drops_only_the_noise_lines(tmp_path, monkeypatch, capfd):
  # A module that writes to file descriptor 2 as TensorFlow's C++ start-up does.
  (tmp_path / 'noisy_module.py').write_text(
      'import os, sys\n'
      'os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are '
      'written to STDERR\\nI0000 port.cc:153] oneDNN custom operations are on. You may see\\n'
      'a warning the user must see\\n")\n'
      'print("from Python", file=sys.stderr)\n'
      'VALUE = 7\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  module = tf_quiet.quiet_import('noisy_module')
  assert module.VALUE == 7
  err = capfd.readouterr().err
  # (in this test sys.stderr is pytest's, so the two lines may come in either order)
  assert sorted(err.splitlines()) == ['a warning the user must see', 'from Python']
  assert tf_quiet.quiet_import('noisy_module') is module  # once imported, returned as it is


def test_without_a_stderr_the_import_still_works(tmp_path, monkeypatch):
  # A process started with stderr closed (`2>&-`): nothing to filter, but the import works.
  (tmp_path / 'plain_module.py').write_text('VALUE = 3\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  def closed(fd):
    raise OSError(9, 'Bad file descriptor')
  monkeypatch.setattr(tf_quiet.os, 'dup', closed)
  assert tf_quiet.quiet_import('plain_module').VALUE == 3


def test_importing_the_data_layer_writes_nothing_to_stderr():
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='1')  # as main.py sets it
  result = subprocess.run([sys.executable, '-c', 'import seg.data.pipeline, seg.data.voc'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stderr == ''
