"""Masks for many images (`main.py predict`): the pipeline (`runner.py`), which files and where
their outputs go (`files.py`), decoding (`images.py`), the files written (`outputs.py`), large
images (`large_images.py`), progress and the final report (`progress.py`), options (`options.py`);
the same masks in Python, for images on disk or in memory (`segmenter.py`)."""

from seg.predict.options import Options
from seg.predict.runner import Pipeline, predict_paths
from seg.predict.segmenter import Segmenter

__all__ = ['Options', 'Pipeline', 'Segmenter', 'predict_paths']
