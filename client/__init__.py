"""neco.client: torch-free dense features, memory banks and in-context segmentation.

Imports only numpy, Pillow, pydantic, pyyaml, tqdm, tritonclient and faiss (a test enforces
it), so applications can install the `client` extra without torch. This package exports what an
application starts from; everything else stays importable from its module (`neco.client.images`,
`neco.client.retrieval`, `neco.client.novelty`, `neco.client.errors`, ...).
"""

from neco.client.backend import FeatureBackend, batch_features
from neco.client.bank import IndexSpec, MemoryBank
from neco.client.errors import (
    BankError,
    ClientError,
    ContractError,
    ImageError,
    InferenceError,
    ServerUnavailableError,
    SupportSetError,
)
from neco.client.images import PreparedImage, load_mask, load_rgb, prepare_image
from neco.client.render import features_to_rgb, overlay
from neco.client.retrieval import UNKNOWN_LABEL, NoveltyResult, SegmentationResult, novelty, segment
from neco.client.transport import RetryPolicy
from neco.client.triton import DenseFeatures, NecoClient

__all__ = [
    # features
    "NecoClient",
    "DenseFeatures",
    "FeatureBackend",
    "batch_features",
    "PreparedImage",
    "prepare_image",
    "load_rgb",
    "load_mask",
    "RetryPolicy",
    # memory banks and what they answer
    "MemoryBank",
    "IndexSpec",
    "segment",
    "SegmentationResult",
    "novelty",
    "NoveltyResult",
    "UNKNOWN_LABEL",
    "overlay",
    "features_to_rgb",
    # the error bases a caller catches (every one derives from neco.errors.NecoError)
    "ClientError",
    "ImageError",
    "ServerUnavailableError",
    "InferenceError",
    "ContractError",
    "BankError",
    "SupportSetError",
]
