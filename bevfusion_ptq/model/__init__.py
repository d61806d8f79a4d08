"""BEVFusion (ResNet50 camera + sparse lidar, ConvFuser, TransFusion head) on mmdet3d 1.x.

Importing this package registers the model's modules in mmdet3d's ``MODELS`` registry.
"""

from .bevfusion import BEVFusion
from .builder import build_model
from .checkpoint import inspect_checkpoint, load_checkpoint, load_model, make_checkpoint
from .config import CONFIG_NAMES, load_config

__all__ = [
    "BEVFusion",
    "CONFIG_NAMES",
    "build_model",
    "inspect_checkpoint",
    "load_checkpoint",
    "load_config",
    "load_model",
    "make_checkpoint",
]
