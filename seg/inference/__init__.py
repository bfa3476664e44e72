"""Inference: the engine (`engine.py`: folded weights `fold.py`, forward pass `forward.py`,
ahead-of-time compiled shape buckets), evaluation (`evaluate.py`, `metrics.py`), the portable
export (`export.py`) and `main.py benchmark` (`benchmark.py`)."""
