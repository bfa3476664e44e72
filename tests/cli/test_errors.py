"""Every command turns the main mistake a user can make into one message and exit status 1.

Each error is raised before anything is compiled (these tests take seconds): the commands run
in this process through the parser and `seg.cli.commands.run`, as `main` calls them; one runs
through main.py to check the exit status and that no traceback is printed.
"""

import os
import subprocess
import sys

import pytest

from helpers import ROOT
from seg.cli import commands
from seg.cli import parser as parser_lib
from seg.data import voc


def _error(*argv) -> str:
  """The CommandError message of `main.py ARGV` (run in this process; experiments/... is
  the repository's)."""
  argv = [os.path.join(ROOT, a) if a.startswith('experiments/') else a for a in argv]
  args = parser_lib.parse(parser_lib.build_parser(), argv)
  with pytest.raises(commands.CommandError) as error:
    commands.run(args)
  return str(error.value)


def _offline(monkeypatch):
  """No network: the download of a missing archive fails at once (as offline, quickly)."""
  def unreachable(url):
    raise OSError(f'{url} unreachable (test)')
  monkeypatch.setattr(voc, '_check_reachable', unreachable)


def test_train_of_a_voc_config_without_weights_exits_1_with_the_import_command(tmp_path):
  workdir = str(tmp_path / 'run')
  result = subprocess.run(
      [sys.executable, 'main.py', 'train', '--config', 'experiments/voc_mnv2_os16.py',
       '--workdir', workdir], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr
  assert 'Traceback' not in result.stderr
  assert 'main.py train: error: ' in result.stderr
  assert ('python main.py import-weights --format deeplab-tf mobilenet_v2_1.0_224 '
          '--output runs/mobilenet_v2_1.0_224') in result.stderr
  assert not os.path.exists(workdir)  # nothing written


def test_train_without_the_dataset_archives_is_one_message(tmp_path, monkeypatch):
  _offline(monkeypatch)
  message = _error('train', '--config', 'experiments/voc_mnv2_os16.py', '--workdir',
                   str(tmp_path / 'run'), f'--config.data.data_dir={tmp_path / "tfds"}',
                   '--config.train.from_scratch=True')
  assert 'VOCtrainval_11-May-2012.tar not found in the manual directory' in message
  assert not os.path.exists(tmp_path / 'run')


def test_train_into_a_workdir_of_another_model_is_one_message(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  from experiments import tiny
  other = tiny.get_config()
  other.model.width = 0.5
  (workdir / 'config.json').write_text(other.to_json())
  message = _error('train', '--config', 'experiments/tiny.py', '--workdir', str(workdir),
                   f'--config.data.data_dir={data_dir}')
  assert 'holds a run of a different model' in message and 'model.width=0.5, not 0.35' in message


def test_eval_of_a_folder_that_is_no_workdir(tmp_path):
  message = _error('eval', '--workdir', str(tmp_path))
  assert 'config.json not found: is' in message


def test_eval_worst_without_output_is_refused_before_anything_is_read(tmp_path):
  # tmp_path holds no workdir: the flag's mistake is named first, not the missing config.
  message = _error('eval', '--workdir', str(tmp_path), '--worst', '5')
  assert message == '--worst writes its panels beside the report: give --output too'


def test_predict_of_a_missing_input(tmp_path):
  message = _error('predict', '--workdir', str(tmp_path), '--input', str(tmp_path / 'nothing'),
                   '--output', str(tmp_path / 'out'))
  assert 'nothing' in message


def test_prepare_data_without_the_archives(tmp_path, monkeypatch):
  _offline(monkeypatch)
  message = _error('prepare-data', '--dataset', 'voc2012', '--data-dir', str(tmp_path))
  assert 'VOCtrainval_11-May-2012.tar not found in the manual directory' in message


def test_import_weights_of_a_missing_checkpoint(tmp_path):
  message = _error('import-weights', '--format', 'deeplab-tf', str(tmp_path / 'missing'),
                   '--output', str(tmp_path / 'out'))
  assert 'missing' in message and not os.path.exists(tmp_path / 'out')


def test_export_of_a_folder_that_is_no_workdir(tmp_path):
  message = _error('export', '--workdir', str(tmp_path), '--output', str(tmp_path / 'm.jax'))
  assert 'config.json not found' in message


def test_benchmark_with_a_bad_config_value():
  message = _error('benchmark', '--config', 'experiments/tiny.py',
                   '--config.model.output_stride=12')
  assert message == 'config.model.output_stride must be one of (8, 16, 32), got 12'


def test_summary_with_a_misspelt_field():
  message = _error('summary', '--config', 'experiments/tiny.py', '--config.model.widht=1')
  assert "model has no field 'widht'" in message


def test_eval_with_a_bad_override_of_the_workdirs_config(tmp_path):
  from experiments import tiny
  (tmp_path / 'config.json').write_text(tiny.get_config().to_json())
  message = _error('eval', '--workdir', str(tmp_path), '--config.model.divisible_by=4')
  assert message == 'config.model.divisible_by must be one of (8, 1), got 4'


def test_calibration_flags_without_int8_are_refused(tmp_path):
  for argv in (['predict', '--workdir', str(tmp_path), '--input', str(tmp_path), '--output',
                str(tmp_path / 'out'), '--calibration', 'photos/'],
               ['eval', '--workdir', str(tmp_path), '--calibration-count', '50'],
               ['export', '--workdir', str(tmp_path), '--output', str(tmp_path / 'm.jax'),
                '--calibration', 'photos/']):
    assert _error(*argv) == '--calibration and --calibration-count are for --dtype int8'
  assert 'needs --workdir' in _error('benchmark', '--config', 'experiments/tiny.py',
                                     '--dtype', 'int8', '--calibration', 'photos/')


@pytest.mark.parametrize('value,message', [('0,1', 'scales must be positive'),
                                           ('1;1.5', 'give comma-separated scales')])
def test_predict_scales_must_be_positive_numbers(tmp_path, capsys, value, message):
  argv = ['predict', '--workdir', str(tmp_path), '--input', str(tmp_path), '--output',
          str(tmp_path / 'out'), '--scales', value]
  with pytest.raises(SystemExit) as exit_status:
    parser_lib.parse(parser_lib.build_parser(), argv)
  assert exit_status.value.code == 2 and message in capsys.readouterr().err
  args = parser_lib.parse(parser_lib.build_parser(), argv[:-1] + ['0.75,1,1.25', '--no-flip'])
  assert args.scales == (0.75, 1.0, 1.25) and args.flip is False


def test_eval_scales_and_flip_stand_for_the_config_eval_overrides(tmp_path):
  from experiments import tiny
  from seg import checkpoint
  checkpoint.save_config(str(tmp_path), tiny.get_config())
  args = parser_lib.parse(parser_lib.build_parser(),
                          ['eval', '--workdir', str(tmp_path), '--scales', '0.75,1', '--flip'])
  overrides = commands._passes_as_overrides(args.scales, args.flip)
  assert overrides == [('eval.scales', '(0.75, 1.0)'), ('eval.flip', 'True')]
  config = commands._workdir_config(str(tmp_path), None, overrides)
  assert tuple(config.eval.scales) == (0.75, 1.0) and config.eval.flip is True
  args = parser_lib.parse(parser_lib.build_parser(), ['eval', '--workdir', str(tmp_path)])
  assert commands._passes_as_overrides(args.scales, args.flip) == []
