"""neco.client: torch-free dense features, memory banks and in-context segmentation.

Imports only numpy, Pillow, pydantic, pyyaml, tqdm, tritonclient and faiss (a test enforces
it), so applications can install the `client` extra without torch.
"""

from .backend import FeatureBackend, batch_features
from .bank import IndexSpec, MemoryBank
from .errors import (
    BankContractError,
    BankCorruptError,
    BankError,
    BankVersionError,
    ClientError,
    ContractError,
    ImageError,
    InferenceError,
    ModelNotFoundError,
    ModelNotReadyError,
    ServerUnavailableError,
    SupportSetError,
)
from .images import ImageLike, PreparedImage, SizeSpec, load_mask, load_rgb, prepare_image, resize_mask
from .render import features_to_rgb, overlay, palette
from .retrieval import (
    SegmentationResult,
    check_contract,
    segment,
    segment_features,
    transfer_labels,
    upsample_bilinear,
)
from .triton import DenseFeatures, NecoClient

__all__ = [
    "BankContractError",
    "BankCorruptError",
    "BankError",
    "BankVersionError",
    "ClientError",
    "ContractError",
    "DenseFeatures",
    "FeatureBackend",
    "ImageError",
    "ImageLike",
    "IndexSpec",
    "InferenceError",
    "MemoryBank",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "NecoClient",
    "PreparedImage",
    "SegmentationResult",
    "ServerUnavailableError",
    "SizeSpec",
    "SupportSetError",
    "batch_features",
    "check_contract",
    "features_to_rgb",
    "load_mask",
    "load_rgb",
    "overlay",
    "palette",
    "prepare_image",
    "resize_mask",
    "segment",
    "segment_features",
    "transfer_labels",
    "upsample_bilinear",
]
