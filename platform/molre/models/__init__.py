"""The model core: backbones (presets), LoRA, MoLRE, attention pooling and the assembled classifier.

Imports torch / timm / MONAI only (no Ray), so it can be tested and benchmarked without a cluster.
"""

from molre.models.backbones import PRESETS, Backbone, create_backbone, get_preset
from molre.models.classifier import MoLREClassifier, build_model, parameter_groups
from molre.models.lora import LoRALinear, inject_lora
from molre.models.molre import MoLRE, molre_param_count
from molre.models.pooling import AttentionPooling
from molre.models.weights import load_backbone_weights

__all__ = [
    "PRESETS",
    "AttentionPooling",
    "Backbone",
    "LoRALinear",
    "MoLRE",
    "MoLREClassifier",
    "build_model",
    "create_backbone",
    "get_preset",
    "inject_lora",
    "load_backbone_weights",
    "molre_param_count",
    "parameter_groups",
]
