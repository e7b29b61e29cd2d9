"""The catalogue of modality encoders. Depends on torch/timm/monai only; never imports medmm.

Every encoder maps a batch of inputs to ``(B, N, D)`` tokens plus an optional ``(B, N)`` bool mask
(True = real token) and exposes ``out_dim`` and ``num_tokens`` (None when N varies with the input).

Importing the package is cheap: the families' modules (``genomics``, ``molecule``, ``pathology``,
``radiology``) register their builders when the registry is first looked up (:data:`registry.ENCODERS`).
"""

from .registry import EncoderOutput, build_encoder, get_encoder_spec, list_encoders, register_encoder

__all__ = ["EncoderOutput", "build_encoder", "get_encoder_spec", "list_encoders", "register_encoder"]
