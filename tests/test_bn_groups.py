"""BatchNorm statistics per view group (``models.batchnorm_groups``, ``method.split_bn``): one forward that
normalises each group as if it had been forwarded alone, and the semi-supervised methods' labeled outputs
no longer depend on the strong views they are forwarded with."""

import copy

import pytest
import torch
from torch import nn

from lesseg import config
from lesseg.methods import RunInfo, build_method
from lesseg.models import batchnorm_groups, build_model

C = 3


def tiny_segmentor() -> nn.Module:
    cfg = config.from_dict({"model": {"encoder": "test_resnet", "decoder_channels": 16, "dropout": 0.0}, "train": {"iters": 1}}).model
    torch.manual_seed(0)
    return build_model(cfg, C).train()


def bn_state(net: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for name, b in net.named_buffers() if "running" in name]


def test_groups_match_forwarding_each_group_alone():
    net = tiny_segmentor()
    alone = copy.deepcopy(net)
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(3, 3, 32, 32, generator=g)
    x2 = torch.randn(2, 3, 32, 32, generator=g) * 3 + 1  # another distribution: other statistics
    with batchnorm_groups(net, [3, 2]):
        joint = net(torch.cat([x1, x2]))["logits"]
    separate = torch.cat([alone(x1)["logits"], alone(x2)["logits"]])
    assert torch.allclose(joint, separate, atol=1e-5)
    for a, b in zip(bn_state(net), bn_state(alone)):  # running statistics updated once per group, in order
        assert torch.allclose(a, b, atol=1e-6)
    # without the groups, the same batch is normalised with the whole batch's statistics: different outputs
    assert not torch.allclose(copy.deepcopy(alone)(torch.cat([x1, x2]))["logits"][:3], separate[:3], atol=1e-3)


class AppendFirst(nn.Module):
    """Appends a copy of the first ``k`` samples (a feature-perturbation stream without dropout)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x):
        return torch.cat([x, x[: self.k] * 2])


def test_appended_samples_are_normalised_with_the_first_group():
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm1d(4), AppendFirst(2), nn.BatchNorm1d(4)).train()
    ref = copy.deepcopy(net)
    x1, x2 = torch.randn(3, 4), torch.randn(2, 4) + 5
    with batchnorm_groups(net, [3, 2]):
        out = net(torch.cat([x1, x2]))
    a1, a2 = ref[0](x1), ref[0](x2)
    first = ref[2](torch.cat([a1, a1[:2] * 2]))  # group 1 and the appended samples together
    want = torch.cat([first[:3], ref[2](a2), first[3:]])
    assert out.shape == (7, 4)
    assert torch.allclose(out, want, atol=1e-6)


class AppendSome(nn.Module):
    """Appends twice samples [start, start + k) (a feature-perturbation stream of a later group)."""

    def __init__(self, start: int, k: int) -> None:
        super().__init__()
        self.start, self.k = start, k

    def forward(self, x):
        return torch.cat([x, x[self.start:self.start + self.k] * 2])


def test_appended_samples_join_the_group_named_by_join():
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm1d(4), AppendSome(3, 2), nn.BatchNorm1d(4)).train()
    ref = copy.deepcopy(net)
    x1, x2, x3 = torch.randn(3, 4), torch.randn(2, 4) + 5, torch.randn(2, 4) * 3
    with batchnorm_groups(net, [3, 2, 2], join=1):
        out = net(torch.cat([x1, x2, x3]))
    a1, a2, a3 = ref[0](x1), ref[0](x2), ref[0](x3)
    second = ref[2](torch.cat([a2, a2 * 2]))  # group 2 and its appended copies together, group 1 untouched
    want = torch.cat([ref[2](a1), second[:2], ref[2](a3), second[2:]])
    assert torch.allclose(out, want, atol=1e-6)
    with pytest.raises(ValueError, match="join=3 names no group"), batchnorm_groups(net, [3, 2, 2], join=3):
        pass


def test_the_layers_come_back_as_they_were():
    net = nn.Sequential(nn.BatchNorm1d(4)).train()
    bn = net[0]
    x = torch.randn(5, 4)
    with batchnorm_groups(net, [3, 2]):
        outer = bn.__dict__["forward"]
        with batchnorm_groups(net, [5]):  # nested: the inner groups apply, then the outer ones again
            assert bn.__dict__["forward"] is not outer
        assert bn.__dict__["forward"] is outer
        with pytest.raises(ValueError, match="fewer than the groups"):
            net(torch.randn(4, 4))
        net.eval()  # running statistics: grouping changes nothing
        assert torch.equal(net(x), nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight,
                                                            bn.bias, False, 0.0, bn.eps))
    assert "forward" not in bn.__dict__
    with pytest.raises(ValueError, match="positive group sizes"), batchnorm_groups(net, [3, 0]):
        pass


SMALL = {"u2pl": {"sup_only_epochs": 0, "num_queries": 4, "num_negatives": 4, "bank_size": 32},
         "u2pl_ael": {"sup_only_epochs": 0, "num_queries": 4, "num_negatives": 4, "bank_size": 32},
         "cps": {"cutmix": True}}


def batch(strong_scale: float) -> dict:
    g = torch.Generator().manual_seed(0)
    lab = {"image": torch.randn(2, 3, 32, 32, generator=g), "mask": torch.randint(0, C, (2, 32, 32), generator=g),
           "valid": torch.ones(2, 32, 32, dtype=torch.bool), "index": torch.arange(2)}
    unl = {"image": torch.randn(2, 3, 32, 32, generator=g), "image_strong": torch.randn(2, 3, 32, 32, generator=g),
           "mask": torch.full((2, 32, 32), 255), "valid": torch.ones(2, 32, 32, dtype=torch.bool),
           "index": torch.arange(2)}
    for k in ("image", "image_strong"):  # every unlabeled view: the labeled group is normalised alone
        unl[k] = unl[k] * strong_scale + (strong_scale - 1)
    return {"labeled": lab, "unlabeled": unl}


@pytest.mark.parametrize("name", ["mean_teacher", "cutmix_seg", "vat", "u2pl", "u2pl_ael", "fixmatch", "unimatch",
                                  "cps", "pseudoseg", "cct", "advsemseg", "gct"])
def test_labeled_loss_ignores_the_other_views_with_split_bn(name):

    def loss_sup(split_bn: bool, scale: float) -> torch.Tensor:
        cfg = config.from_dict({
            "method": {"name": name, "split_bn": split_bn, **SMALL.get(name, {})},
            "model": {"encoder": "test_resnet", "decoder_channels": 16, "rep_dim": 16, "dropout": 0.0},
            "train": {"iters": 10},
        })
        torch.manual_seed(0)
        m = build_method(cfg, RunInfo(num_classes=C, class_names=list("abc"), max_iters=10, iters_per_epoch=2))
        m.train()
        torch.manual_seed(1)  # the same mixing boxes and perturbations in both calls
        return m.training_step(batch(scale), 0)["loss_sup"].detach()

    assert torch.allclose(loss_sup(True, 1.0), loss_sup(True, 4.0), atol=1e-6)
    # the check has teeth: with the whole batch's statistics the other views move the labeled loss
    assert not torch.allclose(loss_sup(False, 1.0), loss_sup(False, 4.0), atol=1e-4)


def test_ripu_source_loss_ignores_the_target_images_with_split_bn():
    """RIPU's two domains normalised apart, as the authors' two forward calls do."""

    def loss_src(split_bn: bool, scale: float) -> torch.Tensor:
        cfg = config.from_dict({
            "method": {"name": "ripu", "split_bn": split_bn},
            "model": {"encoder": "test_resnet", "decoder_channels": 16, "dropout": 0.0},
            "train": {"iters": 10},
        })
        torch.manual_seed(0)
        m = build_method(cfg, RunInfo(num_classes=C, class_names=list("abc"), max_iters=10, iters_per_epoch=2))
        m.train()
        b = batch(scale)
        target = {k: b["unlabeled"][k] for k in ("image", "mask", "valid", "index")}
        return m.training_step({"source": b["labeled"], "target": target}, 0)["loss_src"].detach()

    assert torch.allclose(loss_src(True, 1.0), loss_src(True, 4.0), atol=1e-6)
    assert not torch.allclose(loss_src(False, 1.0), loss_src(False, 4.0), atol=1e-4)
