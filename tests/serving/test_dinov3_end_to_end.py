"""DINOv3 end to end, beside the DINOv2 one (tests/demo/test_demo.py): artefact -> export ->
embedded Triton -> client -> bank -> segment().

The artefact is a random-init DINOv3-S written with `neco.model.save_artefact` (what training
writes); every later stage learns the patch size (16), the prefix tokens and the width from the
model it is handed, and the bank records the DINOv3 contract so a DINOv2 client is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from neco.client import BankError, ImageError, MemoryBank, NecoClient, segment
from neco.client.bank import BankRows, BankSettings
from neco.contract import ModelContract
from neco.scenes import generate_scene

pytestmark = pytest.mark.slow

ARCH = "vit_small_patch16_dinov3"
MODEL_NAME = "neco_dinov3"
SIZE = 128  # 8 x 8 patches of 16 px


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from neco.export.config import ExportConfig
    from neco.export.pipeline import run_export
    from neco.model import save_artefact
    from neco.model.testing import random_backbone
    from neco.serving import EmbeddedServer, ServeConfig

    root = tmp_path_factory.mktemp("dinov3_e2e")
    artefact = save_artefact(random_backbone(ARCH, seed=1), ModelContract.for_arch(ARCH), root / "artefact", {})
    run_export(
        ExportConfig(
            source=str(artefact),
            output=root / "repository",
            model_name=MODEL_NAME,
            onnx={"simplify": False, "example_size": (SIZE, SIZE)},
            parity={"sizes": [(SIZE, SIZE), (SIZE, 2 * SIZE)], "batch_sizes": [1], "atol": 1e-4},
            triton={"instance_kind": "KIND_CPU", "max_batch_size": 4, "preferred_batch_sizes": [4]},
        ),
        progress=lambda _message: None,
    )
    serve = ServeConfig(repository=root / "repository", model_name=MODEL_NAME, http_port=0, grpc_port=0, metrics_port=0)
    with EmbeddedServer(serve) as s:
        yield s


def test_dinov3_model_serves_banks_and_segments(server, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    support = [generate_scene(rng, size=(SIZE, SIZE), num_classes=3) for _ in range(4)]
    query_image, query_mask = generate_scene(rng, size=(96, 150), num_classes=3)
    with NecoClient(server.grpc_url, "grpc", model=MODEL_NAME, size=SIZE) as client:
        assert client.contract.arch == ARCH and client.contract.patch_size == 16
        dense = client.features(query_image)
        assert dense.features.shape == (*dense.image.grid, 384) and dense.image.size[0] % 16 == 0
        with pytest.raises(ImageError, match="multiple of the patch size 16"):
            client.features(np.zeros((1, 126, 126, 3), np.uint8))  # 9 x 9 DINOv2 patches, no DINOv3 grid

        bank = MemoryBank.build(client, support, class_names=["a", "b", "c"], image_size=SIZE)
        assert bank.contract == client.contract and len(bank) == 4 * 8 * 8
        result = segment(client, query_image, bank)
        assert result.mask.shape == query_mask.shape and result.input_size is not None
        assert set(np.unique(result.mask)) <= {0, 1, 2}

        bank.save(tmp_path / "bank")
        loaded = MemoryBank.load(tmp_path / "bank")
        assert loaded.contract.family == "dinov3" and loaded.contract.patch_size == 16
        dinov2 = MemoryBank(
            ModelContract.for_arch("vit_small_patch14_reg4_dinov2"),
            BankRows(bank.features, bank.soft_labels),
            BankSettings(class_names=bank.class_names, image_size=SIZE),
        )
        with pytest.raises(BankError, match="patch_size: 14 != 16"):  # the refusal says what differs
            dinov2.add(client, support[:1])


def test_the_runner_checks_the_served_patch_size(server) -> None:
    """A request that skips the client's check is refused by the served model's runner, at patch 16."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from neco.contract import INPUT_IMAGES

    request = grpcclient.InferInput(INPUT_IMAGES, [1, 126, 126, 3], "UINT8")
    request.set_data_from_numpy(np.zeros((1, 126, 126, 3), np.uint8))
    with pytest.raises(InferenceServerException, match="multiple of the patch size 16"):
        grpcclient.InferenceServerClient(server.grpc_url).infer(MODEL_NAME, [request])
