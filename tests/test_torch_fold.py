"""The torch runtime folds the image tower's batch norms into its convolutions: the rows stay
those of the network as trained, and a network where folding would change them is left as it is."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from conftest import random_image
from mmretrieve.runtime.torch_runtime import TorchEmbedder, fold_batch_norms


class Block(nn.Module):
    """conv -> norm, a conv read by a norm and by a second conv, and a norm after a non-conv."""

    def __init__(self, sneaky: bool = False):
        super().__init__()
        from timm.layers import BatchNormAct2d

        self.stem, self.stem_norm = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.mid, self.mid_norm = nn.Conv2d(8, 8, 1, bias=False), BatchNormAct2d(8, act_layer=nn.ReLU6)
        self.side = nn.Conv2d(8, 8, 1)  # reads mid's output too: mid may not change
        self.pool, self.pool_norm = nn.AvgPool2d(2), nn.BatchNorm2d(8)  # not after a conv
        self.sneaky = sneaky

    def forward(self, pixel_values):
        stem = self.stem(pixel_values)
        y = self.mid(self.stem_norm(stem))
        z = self.mid_norm(y) + self.side(y)
        if self.sneaky:  # stem's output read outside any module: hooks cannot see it, the output check must
            z = z + stem.mean()
        return self.pool_norm(self.pool(z)).flatten(1)


def trained_like(network: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):  # statistics and affine terms that are not the identity
            for tensor in (module.running_mean, module.weight, module.bias):
                tensor.data = torch.randn(tensor.shape, generator=generator)
            module.running_var.data = torch.rand(module.running_var.shape, generator=generator) + 0.5
    return network.eval()


def test_norms_read_only_by_their_convolution_are_folded():
    network = trained_like(Block())
    example = {"pixel_values": torch.randn(2, 3, 16, 16)}
    with torch.no_grad():
        before = network(**example)
    folded, folds = fold_batch_norms(network, example)
    assert folds == 1  # stem's norm; mid's output is also read by side, pool is no convolution
    norms = [type(m).__name__ for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms == ["BatchNormAct2d", "BatchNorm2d"]
    other = {"pixel_values": torch.randn(3, 3, 16, 16)}
    with torch.no_grad():
        assert torch.allclose(folded(**example), before, atol=1e-5)
        assert torch.allclose(folded(**other), network(**other), atol=1e-5)
        assert torch.equal(network(**example), before)  # the original is not touched


def test_timm_norm_with_activation_keeps_its_activation():
    from timm.layers import BatchNormAct2d

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU6))

        def forward(self, pixel_values):
            return self.body(pixel_values)

    wrapped = trained_like(Tower())
    example = {"pixel_values": torch.randn(2, 3, 8, 8) * 20}  # large enough for ReLU6 to clip
    folded, folds = fold_batch_norms(wrapped, example)
    assert folds == 1 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        out = folded(**example)
        assert torch.allclose(out, wrapped(**example), atol=1e-4) and out.max() == 6.0 and out.min() == 0.0


def test_a_network_whose_outputs_folding_would_change_is_left_as_it_is():
    network = trained_like(Block(sneaky=True))
    folded, folds = fold_batch_norms(network, {"pixel_values": torch.randn(2, 3, 16, 16)})
    assert folded is network and folds == 0


def test_torch_runtime_embeds_with_folded_norms_as_the_trained_network(bundle):
    folded, plain = TorchEmbedder(str(bundle), device="cpu"), TorchEmbedder(str(bundle), device="cpu", fold_norms=False)
    images = [random_image(seed, size) for seed, size in enumerate([(80, 60), (33, 90), (300, 40)])]
    rows, reference = folded.embed_images(images), plain.embed_images(images)
    assert np.abs(rows - reference).max() < 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.tower("image")[0].modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.tower("image")[0].modules())
