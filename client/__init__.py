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
    BankStoreError,
    BankStoreUnavailableError,
    BankVersionError,
    ClientError,
    ContractError,
    EndpointError,
    ImageError,
    InferenceError,
    ModelNotFoundError,
    ModelNotReadyError,
    NoveltyError,
    NoveltyNotCalibratedError,
    NoveltyNotFittedError,
    ServerOverloadedError,
    ServerUnavailableError,
    SupportSetError,
)
from .images import ImageLike, PreparedImage, SizeSpec, load_mask, load_rgb, prepare_image, resize_mask
from .novelty import Calibration, NoveltyModel, NoveltySpec
from .render import features_to_rgb, heatmap_overlay, overlay, palette
from .retrieval import (
    UNKNOWN_LABEL,
    NoveltyResult,
    SegmentationResult,
    calibrate_novelty,
    check_contract,
    novelty,
    novelty_features,
    segment,
    segment_features,
    transfer_labels,
    upsample_bilinear,
)
from .transport import RetryPolicy
from .triton import DenseFeatures, NecoClient

__all__ = [
    "BankContractError",
    "BankCorruptError",
    "BankError",
    "BankStoreError",
    "BankStoreUnavailableError",
    "BankVersionError",
    "Calibration",
    "ClientError",
    "ContractError",
    "DenseFeatures",
    "EndpointError",
    "FeatureBackend",
    "ImageError",
    "ImageLike",
    "IndexSpec",
    "InferenceError",
    "MemoryBank",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "NecoClient",
    "NoveltyError",
    "NoveltyModel",
    "NoveltyNotCalibratedError",
    "NoveltyNotFittedError",
    "NoveltyResult",
    "NoveltySpec",
    "PreparedImage",
    "RetryPolicy",
    "SegmentationResult",
    "ServerOverloadedError",
    "ServerUnavailableError",
    "SizeSpec",
    "SupportSetError",
    "UNKNOWN_LABEL",
    "batch_features",
    "calibrate_novelty",
    "check_contract",
    "features_to_rgb",
    "heatmap_overlay",
    "load_mask",
    "load_rgb",
    "novelty",
    "novelty_features",
    "overlay",
    "palette",
    "prepare_image",
    "resize_mask",
    "segment",
    "segment_features",
    "transfer_labels",
    "upsample_bilinear",
]
