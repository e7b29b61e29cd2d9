"""The catalogue of modality encoders. Depends on torch/timm/monai only; never imports medmm.

Every encoder maps a batch of inputs to ``(B, N, D)`` tokens plus an optional ``(B, N)`` bool mask
(True = real token) and exposes ``out_dim`` and ``num_tokens`` (None when N varies with the input).
"""

from . import genomics, molecule, pathology, radiology  # noqa: F401  (registers the builders)
from .registry import EncoderOutput, build_encoder, get_encoder_spec, list_encoders, register_encoder

__all__ = ["EncoderOutput", "build_encoder", "get_encoder_spec", "list_encoders", "register_encoder"]
