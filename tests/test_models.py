import dataclasses

import numpy as np
import pytest
import torch

from sevenpoint.config import ConfigError, load_config
from sevenpoint.models import (XCEPTION_TINY, FusionModel, ModifiedXception, SoftAttention, load_legacy_xception)
from sevenpoint.engine.loss import multitask_loss
from sevenpoint.models.xception import CheckpointMismatch
from sevenpoint.schema import NUM_CLASSES


def tiny_cfg(**model):
    cfg = load_config("tiny", seed=0)
    return dataclasses.replace(cfg.model, **model)


def batch(n=4, size=64, meta_dim=14):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g),
            torch.zeros(n, meta_dim).index_fill_(1, torch.tensor([0, 2, 11]), 1.0))


def test_soft_attention_maps_sum_to_one_and_identity_at_gamma_zero():
    sa = SoftAttention(8, heads=5)
    x = torch.randn(2, 8, 6, 7)
    out, maps = sa(x)
    assert maps.shape == (2, 5, 6, 7)
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(2, 5))
    torch.testing.assert_close(out, x)  # gamma starts at 0
    with torch.no_grad():
        sa.gamma.fill_(2.0)
    out, maps = sa(x)
    alpha = maps.sum(1, keepdim=True)
    torch.testing.assert_close(out, x + 2.0 * alpha * x)
    assert not torch.allclose(out, x)


def test_soft_attention_gradients_reach_conv_and_gamma():
    sa = SoftAttention(4, heads=3)
    with torch.no_grad():
        sa.gamma.fill_(0.5)
        sa.conv.bias.fill_(0.1)  # keep the ReLU open
    x = torch.randn(2, 4, 5, 5)
    out, _ = sa(x)
    (out ** 2).sum().backward()
    assert sa.gamma.grad is not None and sa.gamma.grad.abs() > 0
    assert sa.conv.weight.grad is not None and sa.conv.weight.grad.abs().sum() > 0


def test_soft_attention_rejects_bad_heads():
    with pytest.raises(ValueError):
        SoftAttention(4, heads=0)


def test_xception_shapes_at_299_match_the_paper():
    net = ModifiedXception().eval()
    with torch.no_grad():
        feat, maps = net.forward_features(torch.randn(1, 3, 299, 299))
    assert feat.shape == (1, 2048, 10, 10)
    assert maps["middle"].shape == (1, 16, 19, 19) and maps["exit"].shape == (1, 16, 10, 10)
    assert len(net.flows["middle"]) == 1  # the paper's single middle-flow block


def test_xception_tiny_and_attention_switch():
    net = ModifiedXception(XCEPTION_TINY, attention=False)
    feat, maps = net.forward_features(torch.randn(2, 3, 64, 64))
    assert feat.shape == (2, XCEPTION_TINY.exit_convs[-1], 2, 2) and maps == {}
    assert net.num_features == 64


def test_middle_flow_is_data():
    spec = dataclasses.replace(XCEPTION_TINY, middle=XCEPTION_TINY.middle * 3)
    assert len(ModifiedXception(spec).flows["middle"]) == 3


def test_every_parameter_gets_a_gradient_dcihmm():
    model = FusionModel(tiny_cfg(), 64)
    for m in model.modules():
        if isinstance(m, SoftAttention):
            with torch.no_grad():
                m.gamma.fill_(0.5)  # at gamma=0 the attention conv's gradient is exactly 0 by design
                m.conv.bias.fill_(0.1)
    derm, clinic, meta = batch()
    has_meta = torch.tensor([True, True, False, True])  # trains the "unknown metadata" vector too
    out = model(derm, clinic, meta, has_meta=has_meta)
    loss, parts = multitask_loss(out, torch.zeros(4, 8, dtype=torch.long))
    loss.backward()
    assert set(parts) == {"derm", "clinic", "hybrid"}
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []


def test_shared_backbone_option():
    shared = FusionModel(tiny_cfg(share_backbone=True), 64)
    separate = FusionModel(tiny_cfg(), 64)
    assert shared.derm.backbone is shared.clinic.backbone
    assert separate.derm.backbone is not separate.clinic.backbone
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(shared) < count(separate)


def test_probabilities_per_task_and_branch_sum_to_one_and_late_fusion_is_the_mean():
    model = FusionModel(tiny_cfg(), 64).eval()
    derm, clinic, meta = batch()
    with torch.no_grad():
        out = model(derm, clinic, meta)
    for branch in ("derm", "clinic", "hybrid"):
        for t, p in enumerate(out.branch_probs(branch)):
            assert p.shape == (4, NUM_CLASSES[t])
            torch.testing.assert_close(p.sum(1), torch.ones(4))
    for t in range(8):
        mean = sum(out.branch_probs(b)[t] for b in ("derm", "clinic", "hybrid")) / 3
        torch.testing.assert_close(out.probs[t], mean)


def test_missing_clinic_uses_derm_branch_only_for_that_case():
    model = FusionModel(tiny_cfg(), 64).eval()
    derm, clinic, meta = batch()
    has_clinic = torch.tensor([True, False, True, False])
    with torch.no_grad():
        out = model(derm, clinic, meta, has_clinic=has_clinic)
        alone = model(derm[1:2], None, meta[1:2])
    used = out.branches_used()
    assert used[1].tolist() == [True, False, False] and used[0].tolist() == [True, True, True]
    for t in range(8):
        torch.testing.assert_close(out.probs[t][1], out.branch_probs("derm")[t][1])
        torch.testing.assert_close(out.probs[t][1], alone.probs[t][0])
    assert "clinic.exit" in out.attention and float(out.attention["clinic.exit"][1].abs().sum()) == 0


def test_missing_derm_and_missing_meta():
    model = FusionModel(tiny_cfg(), 64).eval()
    derm, clinic, meta = batch()
    with torch.no_grad():
        out = model(None, clinic, meta)
        no_meta = model(derm, clinic, meta, has_meta=torch.zeros(4, dtype=torch.bool))
    assert out.branches_used()[:, 1].all() and not out.branches_used()[:, [0, 2]].any()
    assert no_meta.branches_used().all()  # hybrid runs with the learned "unknown" metadata


def test_missing_clinic_never_trains_the_clinic_branch():
    model = FusionModel(tiny_cfg(), 64)
    derm, clinic, meta = batch()
    # the loss must depend on clinic images 0, 2, 3 only
    clinic = clinic.clone().requires_grad_(True)
    out = model(derm, clinic, meta, has_clinic=torch.tensor([True, False, True, True]))
    loss, _ = multitask_loss(out, torch.zeros(4, 8, dtype=torch.long))
    loss.backward()
    assert float(clinic.grad[1].abs().sum()) == 0.0 and float(clinic.grad[0].abs().sum()) > 0


@pytest.mark.parametrize("variant, branches", [("DIM", {"derm"}), ("CIM", {"clinic"}),
                                               ("DCIHMM", {"derm", "clinic", "hybrid"})])
def test_variants(variant, branches):
    model = FusionModel(tiny_cfg(variant=variant), 64).eval()
    derm, clinic, meta = batch()
    with torch.no_grad():
        out = model(derm, clinic, meta)
    assert set(out.logits) == branches


def test_no_branch_can_run_is_an_error():
    model = FusionModel(tiny_cfg(variant="DIM"), 64).eval()
    _, clinic, meta = batch()
    with pytest.raises(ValueError, match="no branch could run"):
        model(None, clinic, meta)


def test_pretrained_lite_classifies_a_natural_image():
    """Grace Hopper (public-domain US Navy photo shipped with matplotlib) -> 'military uniform' (652)."""
    import matplotlib.cbook as cbook
    from PIL import Image

    from sevenpoint.models.efficientnet import build_lite

    net = build_lite("efficientnet_lite0", 224).eval()
    img = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB").resize((224, 224))
    x = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() - 127.5) / 127.5
    with torch.no_grad():
        assert int(net(x[None]).argmax()) == 652


def test_lite_backbone_interface():
    cfg = dataclasses.replace(tiny_cfg(), backbone="efficientnet_lite0", pretrained=False)
    model = FusionModel(dataclasses.replace(cfg, variant="DIM"), 64)
    feat, maps = model.derm.backbone.forward_features(torch.randn(1, 3, 64, 64))
    assert feat.shape == (1, 1280, 2, 2) and maps["exit"].shape[1] == cfg.attention_heads


def test_dermoscopy_branch_can_have_its_own_backbone():
    """model.derm_backbone: a larger dermoscopy backbone beside the clinical one; the hybrid branch
    reads both (same grid at one image size) and gradients reach both."""
    def size(module):
        return sum(p.numel() for p in module.parameters())

    cfg = tiny_cfg(backbone="efficientnet_lite0", derm_backbone="efficientnet_lite1", pretrained=False)
    model = FusionModel(cfg, 64)
    alike = FusionModel(dataclasses.replace(cfg, derm_backbone=None), 64)
    assert size(alike.derm.backbone) == size(alike.clinic.backbone) == size(model.clinic.backbone)
    assert size(model.derm.backbone) > size(model.clinic.backbone)  # Lite1 is the larger network
    derm, clinic, meta = batch(size=64)
    out = model(derm, clinic, meta)
    assert set(out.logits) == {"derm", "clinic", "hybrid"}
    loss, _ = multitask_loss(out, torch.zeros(4, 8, dtype=torch.long))
    loss.backward()
    assert all(p.grad is not None for b in (model.derm.backbone, model.clinic.backbone)
               for p in b.parameters())
    assert cfg.backbone_text == "efficientnet_lite1 (derm) + efficientnet_lite0"


@pytest.mark.parametrize("overrides, match", [
    (["model.derm_backbone=resnet50"], "model.derm_backbone: 'resnet50' is not one of"),
    (["model.derm_backbone=efficientnet_lite2", "model.share_backbone=true"], "cannot share one"),
    (["model.derm_backbone=xception"], "must both ship ImageNet weights"),
])
def test_derm_backbone_is_validated_when_loaded(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("cpu-recipe", overrides)


def _legacy_state(net: ModifiedXception) -> dict:
    names = net.legacy_names()
    return {legacy: torch.randn_like(net.state_dict()[ours].float()).to(net.state_dict()[ours].dtype)
            for ours, legacy in names.items()} | {"fc.weight": torch.randn(1000, 64), "block5.rep.1.conv1.weight": torch.randn(1)}


def test_user_xception_checkpoint_loads_into_kept_layers(tmp_path):
    net = ModifiedXception(XCEPTION_TINY)
    state = _legacy_state(net)
    torch.save(state, tmp_path / "x.pth")
    report = load_legacy_xception(net, tmp_path / "x.pth")
    assert len(report.loaded) == len(net.legacy_names())
    torch.testing.assert_close(net.state_dict()["flows.middle.0.rep.1.pointwise.weight"],
                               state["block4.rep.1.pointwise.weight"])
    torch.testing.assert_close(net.conv3.conv1.weight, state["conv3.conv1.weight"])
    assert "fc.weight" in report.unused and "block5.rep.1.conv1.weight" in report.unused
    assert any("attention" in k for k in report.missing)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "x.safetensors")
    assert len(load_legacy_xception(ModifiedXception(XCEPTION_TINY), tmp_path / "x.safetensors").loaded) == len(report.loaded)


def test_mismatched_xception_checkpoint_names_the_tensors(tmp_path):
    net = ModifiedXception(XCEPTION_TINY)
    state = _legacy_state(net)
    state["conv1.weight"] = torch.randn(5, 3, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatch, match=r"conv1\.weight: file \(5, 3, 3, 3\)"):
        load_legacy_xception(net, tmp_path / "bad.pth")
    torch.save({"something.else": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointMismatch, match="no tensor matches"):
        load_legacy_xception(net, tmp_path / "other.pth")


@pytest.mark.parametrize("backbone", ["xception_tiny", "efficientnet_lite0"])
def test_freeze_blocks_fixes_early_weights_and_bn_statistics(backbone):
    cfg = tiny_cfg(backbone=backbone, pretrained=False, variant="DIM", freeze_blocks=2)
    model = FusionModel(cfg, 64).train()
    net = model.derm.backbone
    frozen = {id(p) for layer in net.early_layers(2) for p in layer.parameters()}
    stats = {k: b for k, b in net.named_buffers() if k.endswith("running_mean")}
    stats_before = {k: b.clone() for k, b in stats.items()}
    derm, clinic, meta = batch(size=64)
    loss, _ = multitask_loss(model(derm, clinic, meta), torch.zeros(4, 8, dtype=torch.long))
    loss.backward()
    changed = {k for k, b in stats.items() if not torch.equal(stats_before[k], b)}
    frozen_buffers = {id(b) for layer in net.early_layers(2) for b in layer.buffers()}
    frozen_bn = {k for k, b in stats.items() if id(b) in frozen_buffers}
    assert frozen_bn and not (changed & frozen_bn)  # frozen BN layers kept their statistics
    assert changed - frozen_bn  # later BN layers still learn theirs
    for p in net.parameters():
        assert (p.grad is None) == (id(p) in frozen)  # no gradient exactly for the frozen layers
    assert model.training and all(not layer.training for layer in net.early_layers(2))
    with pytest.raises(ValueError, match="freeze_blocks=99"):
        FusionModel(dataclasses.replace(cfg, freeze_blocks=99), 64)


def test_a_backbone_is_one_registry_entry(monkeypatch):
    """A new backbone needs one entry: config validation and model building read it."""
    from torch import nn

    from sevenpoint.config import load_config
    from sevenpoint.models import BACKBONES, Backbone
    from sevenpoint.models.freeze import EarlyFreeze

    class Toy(EarlyFreeze, nn.Module):
        num_features = 12

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 12, 3, stride=4)

        def early_layers(self, n_blocks):
            return [self.conv][:n_blocks]

        def forward_features(self, x):
            return self.conv(x), {}

    monkeypatch.setitem(BACKBONES, "toy", Backbone(lambda cfg, size: Toy(), 64, user_weights=False,
                                                               packaged_weights=False))
    cfg = load_config("tiny", ["model.backbone=toy", "model.attention=false"])
    model = FusionModel(cfg.model, 64)
    out = model(torch.zeros(2, 3, 64, 64), torch.zeros(2, 3, 64, 64), torch.zeros(2, 14))
    assert isinstance(model.derm.backbone, Toy) and out.probs[0].shape == (2, 5)
    with pytest.raises(ConfigError, match="does not take user weights"):
        load_config("tiny", ["model.backbone=toy", "model.backbone_checkpoint=w.safetensors"])
