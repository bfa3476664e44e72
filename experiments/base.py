"""The defaults of every field (`seg.config.default_config`): DeepLab's recipe for MobileNetV2.

Not an experiment to train as is on the embedded data; experiments import `get_config()` from
here and override a few fields.

    python main.py summary --config experiments/base.py
"""

from seg.config import default_config as get_config  # noqa: F401
