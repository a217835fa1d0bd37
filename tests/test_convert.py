"""groupmixnorm.nn.convert: BatchNorm layers of any model become GroupMixNorm, or GroupMixNorm is inserted."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from groupmixnorm.methods import ModelSpec, build_cnn, build_network
from groupmixnorm.nn import GroupMixNorm1d, GroupMixNorm2d, convert, torchvision_model, use_groups


class BasicBlock(nn.Module):
    """A torchvision-style residual block: two conv-bn pairs and a downsampling shortcut."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.downsample = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride=2, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.downsample(x))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.BatchNorm1d(4, momentum=None), nn.Linear(4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layer1(torch.relu(self.bn1(self.conv1(x))))))


BATCH_NORMS = ["bn1", "layer1.bn1", "layer1.bn2", "layer1.downsample.1", "fc.2"]


@pytest.fixture()
def trained_resnet() -> TinyResNet:
    """A model whose batch-norm layers hold non-trivial affines and running statistics."""
    torch.manual_seed(0)
    model = TinyResNet()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(module.weight, 0.5, 2.0)
            nn.init.uniform_(module.bias, -1.0, 1.0)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 8, 8) * 3 + 1)  # training mode: running statistics move
    return model.eval()


def test_converted_model_in_evaluation_computes_what_the_batch_norm_model_did(trained_resnet) -> None:
    x = torch.randn(10, 3, 8, 8) * 3 + 1
    expected = trained_resnet(x)
    converted = convert(trained_resnet, num_groups=2).eval()
    kinds = {name: type(module) for name, module in converted.named_modules()}
    assert [name for name, kind in kinds.items() if kind in (GroupMixNorm1d, GroupMixNorm2d)] == BATCH_NORMS
    assert kinds["fc.2"] is GroupMixNorm1d and kinds["layer1.downsample.1"] is GroupMixNorm2d
    assert not any(issubclass(kind, nn.modules.batchnorm._BatchNorm) for kind in kinds.values())
    torch.testing.assert_close(converted(x), expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(trained_resnet(x), expected)  # the original was copied, not changed


def test_conversion_copies_weights_running_statistics_and_options(trained_resnet) -> None:
    converted = convert(trained_resnet, num_groups=2, mix="pairwise", align_quantiles=8)
    for name in BATCH_NORMS:
        old, new = trained_resnet.get_submodule(name), converted.get_submodule(name)
        for attribute in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(new, attribute), getattr(old, attribute)), (name, attribute)
        assert (new.eps, new.momentum, new.num_groups, new.mix, new.align_quantiles) == (
            old.eps, old.momentum, 2, "pairwise", 8)
        assert new.training == old.training


def test_only_the_chosen_layers_are_replaced(trained_resnet) -> None:
    by_name = convert(trained_resnet, layers=["layer1.bn1", "fc.2"])
    assert isinstance(by_name.layer1.bn1, GroupMixNorm2d) and isinstance(by_name.fc[2], GroupMixNorm1d)
    assert type(by_name.bn1) is nn.BatchNorm2d and type(by_name.layer1.bn2) is nn.BatchNorm2d
    by_rule = convert(trained_resnet, layers=lambda name, module: name.startswith("layer1"))
    replaced = {n for n, m in by_rule.named_modules() if isinstance(m, (GroupMixNorm1d, GroupMixNorm2d))}
    assert replaced == {"layer1.bn1", "layer1.bn2", "layer1.downsample.1"}
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(by_rule(x), trained_resnet(x), atol=1e-5, rtol=1e-5)


def test_bad_layer_names_are_errors(trained_resnet) -> None:
    with pytest.raises(ValueError, match="'layer9.bn1'"):
        convert(trained_resnet, layers=["layer9.bn1"])
    with pytest.raises(ValueError, match=r"layer1.conv1 \(Conv2d\)"):
        convert(trained_resnet, layers=["layer1.conv1"])
    with pytest.raises(ValueError, match="insert_after"):
        convert(trained_resnet, layers=(), insert_after=["nope"])


def test_training_reads_the_groups_from_use_groups(trained_resnet) -> None:
    model = convert(trained_resnet, layers=["bn1"], num_groups=2).train()
    x, groups = torch.randn(12, 3, 8, 8), torch.tensor([0, 1] * 6)
    with pytest.raises(ValueError, match="use_groups"):
        model(x)
    outputs = {}
    model.bn1.register_forward_hook(lambda module, inputs, output: outputs.update(bn1=output))
    with use_groups(groups):
        model(x)
    assert int(model.bn1.num_batches_tracked) == int(trained_resnet.bn1.num_batches_tracked) + 1
    # The shared mixture leaves both groups with the same per-channel mean: the layer saw the groups.
    means = [outputs["bn1"][groups == g].mean(dim=(0, 2, 3)) for g in (0, 1)]
    torch.testing.assert_close(means[0], means[1], atol=1e-4, rtol=1e-4)


def test_insert_after_blocks_adds_a_layer_of_the_block_width(trained_resnet) -> None:
    model = convert(trained_resnet, layers=(), insert_after=["layer1", "fc.1"], num_groups=2)
    assert isinstance(model.layer1, nn.Sequential) and isinstance(model.layer1[0], type(trained_resnet.layer1))
    assert isinstance(model.layer1[1], GroupMixNorm2d) and model.layer1[1].num_features == 16
    assert isinstance(model.fc[1][1], GroupMixNorm1d) and model.fc[1][1].num_features == 4
    assert type(model.bn1) is nn.BatchNorm2d
    with use_groups(torch.tensor([0, 1] * 4)):
        assert model.train()(torch.randn(8, 3, 8, 8)).shape == (8, 1)


def test_torchvision_model_says_how_to_install_torchvision(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    with pytest.raises(ImportError, match=r"groupmixnorm\[vision\]"):
        torchvision_model("resnet18")


def test_cnn_builder_places_the_layers_it_is_asked_for() -> None:
    cnn = build_cnn((3, 16, 16), (4, 8, 8), norm="groupmixnorm", placement="0,2,head,logit", num_groups=2)
    kinds = [type(m).__name__ for m in cnn]
    assert kinds.count("GroupMixNorm2d") == 2 and kinds.count("GroupMixNorm1d") == 2
    assert kinds[-1] == "GroupMixNorm1d" and cnn[-1].num_features == 1
    cnn.eval()
    assert cnn(torch.randn(2, 3, 16, 16)).shape == (2, 1)
    image = build_network(ModelSpec(3 * 8 * 8, 2, (4, 8), (3, 8, 8)), norm="batchnorm")
    rows = build_network(ModelSpec(20, 2, (8,)), norm="batchnorm")
    assert any(isinstance(m, nn.BatchNorm2d) for m in image) and isinstance(rows[0], nn.Linear)
    with pytest.raises(ValueError, match="input_shape"):
        build_cnn((8, 8), (4,))
