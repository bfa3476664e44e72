"""Evaluate a voc_mnv2_os16.py run at output stride 8 (same weights, denser features).

    python main.py eval --config experiments/voc_mnv2_os8_eval.py --workdir runs/voc_mnv2_os16

The MobileNetV2 paper evaluates its OS16-trained model at OS8 too (Table 7). Not
reproduced here (see voc_mnv2_os16.py).
"""

from experiments import voc_mnv2_os16


def get_config():
  config = voc_mnv2_os16.get_config()
  config.model.output_stride = 8
  return config
