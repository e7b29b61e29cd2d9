"""medmm: multimodal clinical foundation models.

Modality encoders (``encoders/``) project into one Hugging Face causal LM; DeepSpeed trains it;
``medmm.inference`` decodes; ``medmm.export`` writes merged checkpoints. Heavy extras import lazily.
"""

from . import errors  # noqa: F401  (makes every registry's unknown name a ConfigError: see medmm.errors)

__version__ = "0.1.0"
