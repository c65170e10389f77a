"""`neco.model`: the one torch module for the encoder, shared by training, export and evaluation.

- `create_backbone`, `load_backbone` (artefact, training checkpoint, DINOv2 .pth, NeCo .ckpt,
  timm id from the local cache), `freeze_all_but_last_blocks`;
- the training artefact: `save_artefact`, `read_artefact_contract`, `config_hash`;
- dense features: `normalize`, `patch_features`, `DenseFeatureModel` (uint8 NHWC in,
  unit-norm patch features + raw + CLS out), `resolve_device`.
Test helpers live in `neco.model.testing`.
"""

from neco.model.artefact import config_hash, read_artefact_contract, save_artefact
from neco.model.backbone import create_backbone, freeze_all_but_last_blocks, load_backbone, load_state_into
from neco.model.errors import ArchitectureMismatchError, WeightsError
from neco.model.features import DenseFeatureModel, normalize, patch_features, resolve_device

__all__ = [
    "ArchitectureMismatchError",
    "DenseFeatureModel",
    "WeightsError",
    "config_hash",
    "create_backbone",
    "freeze_all_but_last_blocks",
    "load_backbone",
    "load_state_into",
    "normalize",
    "patch_features",
    "read_artefact_contract",
    "resolve_device",
    "save_artefact",
]
