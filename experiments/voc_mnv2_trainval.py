"""voc_mnv2_os16.py trained on VOC 2012 trainval (2,913 images), e.g. for the test server.

    python main.py prepare-data --dataset voc2012 --manual-dir /path/with/archives
    python main.py train --config experiments/voc_mnv2_trainval.py --workdir runs/voc_trainval

Its val figure is not a held-out measure (val is part of trainval). Not reproduced here.
"""

from experiments import voc_mnv2_os16


def get_config():
  config = voc_mnv2_os16.get_config()
  config.data.dataset = 'voc2012'
  config.data.train_split = 'trainval'
  return config
