"""NeCo's network pieces on DINOv3 (timm `Eva`: patch 16, RoPE, 1 class + 4 register tokens).

Every expectation here comes from timm's own forward pass (`forward_features`, and the softmax
inside `EvaAttention` captured by a hook), not from the project's re-implementation.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from neco.training.head import ProjectionHead
from neco.training.method import NeCoNet, cls_attention
from tests.training.tiny import one_thread, tiny_backbone  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "vit_small_patch16_dinov3"
PREFIX = 5  # 1 class + 4 register tokens


def _net(seed: int = 0) -> NeCoNet:
    torch.manual_seed(seed)
    backbone = tiny_backbone(ARCH)
    with torch.no_grad():  # trained-like magnitudes: timm initialises these near zero
        backbone.reg_token.normal_()
        backbone.cls_token.normal_()
        for name, param in backbone.named_parameters():
            if "gamma" in name:
                param.fill_(1.0)
    return NeCoNet(backbone, ProjectionHead(384, 64, 32))


def _timm_last_block_softmax(net: NeCoNet, images: Tensor) -> Tensor:
    """[B, heads, N, N] attention probabilities of the last block, from timm's unfused forward."""
    attn = net.backbone.blocks[-1].attn
    captured: list[Tensor] = []
    # timm applies attn_drop to the softmax output; its input is the attention matrix.
    handle = attn.attn_drop.register_forward_hook(lambda _m, args, _out: captured.append(args[0].detach()))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        with torch.no_grad():
            net.backbone.forward_features(images)
    finally:
        attn.fused_attn = fused
        handle.remove()
    assert len(captured) == 1
    return captured[0]


def test_the_backbone_is_dinov3_shaped() -> None:
    net = _net()
    assert type(net.backbone).__name__ == "Eva" and net.backbone.num_prefix_tokens == PREFIX
    assert net.patch_size == 16


def test_projected_maps_are_the_head_of_timms_patch_tokens() -> None:
    net = _net().eval()
    images = torch.randn(2, 3, 48, 80)  # 3 x 5 patches, non-square: RoPE per grid
    maps, _ = net.encode(images)
    with torch.no_grad():
        tokens = net.backbone.forward_features(images)
        expected = net.head(tokens[:, PREFIX:]).transpose(1, 2).reshape(2, -1, 3, 5)
    assert maps.shape == (2, 32, 3, 5)
    torch.testing.assert_close(maps, expected)


@pytest.mark.parametrize("size", [(64, 64), (80, 112)])
def test_cls_attention_equals_timms_softmax_with_rope(size: tuple[int, int]) -> None:
    """The class token's last-block attention to the patches, averaged over heads, is exactly what
    timm's EvaAttention computes (q.k after RoPE on the patch tokens); prefix tokens are excluded."""
    net = _net(1).eval()
    images = torch.randn(2, 3, *size)
    h, w = size[0] // 16, size[1] // 16
    _, attention = net.encode(images, with_attention=True)
    probs = _timm_last_block_softmax(net, images)
    assert probs.shape == (2, 6, PREFIX + h * w, PREFIX + h * w)
    expected = probs[:, :, 0, PREFIX:].mean(1).reshape(2, h, w)
    assert attention is not None and attention.shape == (2, h, w)
    torch.testing.assert_close(attention, expected, rtol=1e-5, atol=1e-7)
    # The map is not position-free: without RoPE the same block attends differently.
    x, rope, prefix, _, _ = net._embed(images)
    with torch.no_grad():
        x = net.backbone.blocks[0](x, rope=rope)
    without_rope = cls_attention(net.backbone.blocks[-1], x, prefix).reshape(2, h, w)
    assert not torch.allclose(without_rope, attention, rtol=1e-3, atol=1e-6)
    assert (attention.flatten(1).sum(1) < 1).all()  # the prefix tokens take the rest


def test_cls_attention_with_a_qkv_bias() -> None:
    """The `_qkvb` variants carry q/v biases (and a zero k bias) in the fused projection."""
    torch.manual_seed(2)
    backbone = tiny_backbone(f"{ARCH}_qkvb")
    with torch.no_grad():
        for block in backbone.blocks:
            block.attn.q_bias.normal_()
            block.attn.v_bias.normal_()
    net = NeCoNet(backbone, ProjectionHead(384, 64, 32)).eval()
    images = torch.randn(1, 3, 64, 48)
    _, attention = net.encode(images, with_attention=True)
    expected = _timm_last_block_softmax(net, images)[:, :, 0, PREFIX:].mean(1).reshape(1, 4, 3)
    torch.testing.assert_close(attention, expected, rtol=1e-5, atol=1e-7)


def test_registers_cannot_be_dropped_from_dinov3() -> None:
    with pytest.raises(ValueError, match="DINOv2 register models only"):
        NeCoNet(tiny_backbone(ARCH), ProjectionHead(384, 64, 32), keep_registers=False)
