"""voc_mnv2_os16.py with the full ASPP head (three 3x3 atrous branches, rates 6/12/18).

    python main.py train --config experiments/voc_mnv2_aspp.py --workdir runs/voc_mnv2_aspp

The MobileNetV2 paper reports that full ASPP adds little for MobileNetV2 at much higher
cost; not reproduced here (see voc_mnv2_os16.py).
"""

from experiments import voc_mnv2_os16


def get_config():
  config = voc_mnv2_os16.get_config()
  config.model.head = 'aspp'
  return config
