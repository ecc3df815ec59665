"""Sparse autoencoders: the model (:mod:`.model`) and the registry of file formats (:mod:`.loaders`)."""

from guardrails.sae.model import SAE, EncodeOutput, SAEConfig, SAEError

__all__ = ["SAE", "EncodeOutput", "SAEConfig", "SAEError"]
