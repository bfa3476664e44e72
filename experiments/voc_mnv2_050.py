"""voc_mnv2_os16.py with MobileNetV2 width 0.5.

    python main.py train --config experiments/voc_mnv2_050.py --workdir runs/voc_mnv2_050

DeepLab's model zoo lists a width-0.5 MobileNetV2 model on VOC; no figure from it has been
reproduced in this repository (see voc_mnv2_os16.py).
"""

from experiments import voc_mnv2_os16


def get_config():
  config = voc_mnv2_os16.get_config()
  config.model.width = 0.5
  return config
