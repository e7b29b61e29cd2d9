"""Task recipes that train an encoder + head without the LLM: druggability (molecules) and DNA sequence
classification. ``python -m medmm.tasks --config configs/tasks/<recipe>.yaml`` (or ``medmm train``).
"""

from . import druggability, sequence  # noqa: F401  (register the featurisers)
from .head import HeadPredictor, HeadTaskConfig, is_head_checkpoint, run_head_task

__all__ = ["HeadPredictor", "HeadTaskConfig", "is_head_checkpoint", "run_head_task"]
