"""One process of tests/train/test_launch.py's shared-workdir test.

    python tests/train/shared_workdir_worker.py COORDINATOR PROCESS_ID OUT_DIR

Checks OUT_DIR/shared (one folder for both processes), then OUT_DIR/host<ID> (one each).
"""

import os
import sys

from seg import checkpoint, parallel


def main(coordinator, process_id, out_dir):
  parallel.initialize_distributed(coordinator, 2, int(process_id))
  checkpoint.check_shared_workdir(os.path.join(out_dir, 'shared'), timeout=5)
  print('shared: ok', flush=True)
  try:
    checkpoint.check_shared_workdir(os.path.join(out_dir, f'host{process_id}'), timeout=2)
    print('unshared: ok', flush=True)
  except checkpoint.WorkdirNotShared as e:
    print(f'unshared: WorkdirNotShared: {e}', flush=True)


if __name__ == '__main__':
  main(*sys.argv[1:])
