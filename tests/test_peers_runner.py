"""benchmarks/peers/run.py with stand-in rows: records, interleaving and the table's arithmetic.

Two --extra commands are Python one-liners printing fixed JSON (no torch or onnxruntime
needed); one of them reports a different time each round, so medians and spreads are real.
"""

import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_records_every_run_and_the_table_divides_medians(tmp_path):
  counter = tmp_path / 'calls'
  # 'base': 30 ms per batch of any size. 'other': 12, 36, 24 ms per image in rounds 1-3.
  base = ('python -c "import json; print(\'log line\'); print(json.dumps({\'median_ms\': 30.0, '
          '\'peak_rss_mb\': 100.0}))"')
  other = ('python -c "import os; p={path!r}; n=os.path.getsize(p) if os.path.exists(p) else 0; '
           'open(p, \'a\').write(\'x\'); print(\'{{\\"median_ms\\": %s, \\"peer\\": \\"x\\", '
           '\\"peak_rss_mib\\": %d}}\' % ([12, 36, 24][n // 2] * {{batch}}, 50 + n))"'
           ).format(path=str(counter))
  output = tmp_path / 'out.jsonl'
  result = subprocess.run(
      [sys.executable, 'benchmarks/peers/run.py', '--only', 'none', '--rounds', '3',
       '--batches', '1,4', '--warmup', '0', '--iters', '2', '--extra', f'base={base}',
       '--extra', f'other={other}', '--baseline', 'base', '--output', str(output)],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr

  records = [json.loads(line) for line in output.read_text().splitlines()]
  # Interleaved: each round runs both rows at batch 1, then both at batch 4.
  assert [(r['round'], r['batch'], r['name']) for r in records] == [
      (k, b, n) for k in (1, 2, 3) for b in (1, 4) for n in ('base', 'other')]
  for r in records:
    assert r['cpu']['model'] and isinstance(r['cpu']['flags'], list)
    assert r['date_utc'] and r['command'].startswith('python -c')
    assert (r['height'], r['width']) == (513, 513)
  assert {r['command'].count('* 4') for r in records if r['name'] == 'other'
          and r['batch'] == 4} == {1}   # {batch} was filled in
  assert {r['peer'] for r in records} == {'base', 'x'}   # 'peer' kept when the record has one

  def ms_per_image(name, batch):
    return [r['median_ms'] / batch for r in records if r['name'] == name and r['batch'] == batch]

  # The one-liners' own numbers, computed here without run.py.
  assert ms_per_image('other', 1) == [12, 36, 24] and ms_per_image('other', 4) == [12, 36, 24]
  rows = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')[1:-1]]
          for line in result.stdout.splitlines() if line.startswith('| ')}
  # Columns: row, variant, input, then per batch (ms/image, spread, RSS), then one ratio per batch.
  other_row, base_row = rows['other'], rows['base']
  assert other_row[3:6] == ['24.0', '12.0-36.0', '54']   # median 24, RSS max over rounds 50+4
  assert base_row[3:6] == ['30.0', '30.0-30.0', '100']
  assert base_row[6] == '7.5'   # 30 ms per batch of 4
  for column, batch in ((9, 1), (10, 4)):
    expected = statistics.median(ms_per_image('other', batch)) / statistics.median(
        ms_per_image('base', batch))
    assert other_row[column] == f'{expected:.2f}'
    assert base_row[column] == '1.00'
  assert (other_row[9], other_row[10]) == ('0.80', '3.20')

  # --report prints the same table from the file.
  report = subprocess.run([sys.executable, 'benchmarks/peers/run.py', '--report', str(output),
                           '--baseline', 'base'], cwd=ROOT, capture_output=True, text=True)
  assert [line for line in result.stdout.splitlines() if line.startswith('|')] == \
      report.stdout.splitlines()


def test_run_rejects_unknown_rows_and_malformed_extras():
  for args, message in ((['--only', 'tensorflow'], 'unknown'),
                        (['--only', 'none', '--extra', 'no-equals-sign'], 'NAME=COMMAND')):
    result = subprocess.run([sys.executable, 'benchmarks/peers/run.py', *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and message in result.stderr
