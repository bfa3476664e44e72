"""The command line: `python main.py COMMAND [flags]`; `python main.py --help` lists the commands.

    python main.py train --config experiments/quickstart.py --workdir runs/quickstart
    python main.py predict --workdir runs/quickstart --input photos/ --output masks/

Everything is in the package: this file only hands the arguments to `seg.cli.main`, as the
`seg` command installed by `pip install -e .` does.
"""

import sys

from seg.cli import main

if __name__ == '__main__':
  sys.exit(main())
