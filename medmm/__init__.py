"""medmm: multimodal clinical foundation models.

Modality encoders (``encoders/``) project into one Hugging Face causal LM; DeepSpeed trains it;
``medmm.inference`` decodes; ``medmm.export`` writes merged checkpoints. Heavy extras import lazily.
"""

__version__ = "0.1.0"
