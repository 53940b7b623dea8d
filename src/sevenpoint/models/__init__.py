"""Models: soft attention, backbones (modified Xception, EfficientNet-Lite), three-branch fusion."""

from .attention import SoftAttention
from .backbones import BACKBONES, Backbone, build_backbone
from .fusion import BRANCHES, VARIANT_BRANCHES, FusionEnsemble, FusionModel, FusionOutput, late_fusion
from .static_graph import DenseFusion, freeze_for_inference, split_outputs
from .xception import XCEPTION_PAPER, XCEPTION_TINY, BlockSpec, ModifiedXception, XceptionSpec, load_legacy_xception

__all__ = [
    "BACKBONES", "BRANCHES", "Backbone", "DenseFusion", "VARIANT_BRANCHES", "BlockSpec", "FusionEnsemble", "FusionModel", "FusionOutput", "ModifiedXception",
    "SoftAttention", "freeze_for_inference", "XCEPTION_PAPER", "XCEPTION_TINY", "XceptionSpec", "build_backbone", "late_fusion",
    "load_legacy_xception", "split_outputs",
]
