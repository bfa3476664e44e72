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


def test_a_process_that_dies_in_the_block_still_shows_its_lines():
  # TensorFlow's import aborting (a failed check, a CPU it was not built for): what it wrote
  # before dying reaches stderr, less the noise lines.
  script = ('import os\n'
            'from seg.data.tf_quiet import filtered_stderr\n'
            'with filtered_stderr():\n'
            '  os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on.\\n"\n'
            '              b"F0000 this CPU lacks AVX: why the import died\\n")\n'
            '  os.abort()\n')
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == -6  # SIGABRT
  assert result.stderr == 'F0000 this CPU lacks AVX: why the import died\n'


def test_without_a_forwarding_process_the_lines_come_at_the_end(monkeypatch, capfd):
  def no_process(*args, **kwargs):
    raise OSError(2, 'No such file or directory')
  monkeypatch.setattr(tf_quiet.subprocess, 'Popen', no_process)
  with tf_quiet.filtered_stderr():
    os.write(2, b'kept\nI0000 oneDNN custom operations are on. dropped\n')
  assert capfd.readouterr().err == 'kept\n'
