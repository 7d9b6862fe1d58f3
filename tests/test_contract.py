"""The contract every registered method passes (architecture.md, item 7): one CPU step on tiny data gives a
finite loss; every declared loss term gives gradient to every trainable network it should reach (a term
that is identically 0 or detached fails); teachers get none and EMA moves them; the state round-trips
through a checkpoint; a tiny training with an evaluation in the middle keeps every module's mode."""

import io

import pytest
import torch
import toy_active  # noqa: F401  (the rounds toy method passes the contract too)

from lesseg import config
from lesseg.methods import METHODS, RunInfo, build_method

C, H, W, B = 3, 32, 32, 2


def make_batch(method_cls, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for name in method_cls.streams:
        mask = torch.randint(0, C, (B, H, W), generator=g)
        mask[:, :2] = 255  # an ignore band
        valid = torch.ones(B, H, W, dtype=torch.bool)
        valid[:, -3:] = False  # crop padding
        batch[name] = {
            "image": torch.randn(B, 3, H, W, generator=g),
            "image_strong": torch.randn(B, 3, H, W, generator=g),
            "mask": mask,
            "valid": valid,
            "tags": torch.ones(B, C),
            "index": torch.arange(B),
        }
    return batch


def build(name: str, **method_over):
    cfg = config.from_dict({
        "method": {"name": name, **method_over},
        "model": {"encoder": "test_resnet", "decoder_channels": 16, "rep_dim": 16},
        "train": {"iters": 10},
    })
    torch.manual_seed(0)
    return build_method(cfg, RunInfo(num_classes=C, class_names=list("abc"), max_iters=10, iters_per_epoch=2))


def method_defaults(name: str) -> dict:
    """Small settings so that every branch of a method runs in the first steps."""
    return {
        "u2pl": {"sup_only_epochs": 0, "num_queries": 4, "num_negatives": 4, "bank_size": 32},
        "u2pl_ael": {"sup_only_epochs": 0, "num_queries": 4, "num_negatives": 4, "bank_size": 32, "contra_start_epochs": 0},
        "gct": {"fd_channels": 8, "fd_min_side": 128, "fd_lr_mult": 0.01},  # small; 3x3 map; detector lr 1e-4
        "ripu": {"rounds": [0.5], "nl_tau": 0.9},  # nl: every entry qualifies
        "fixmatch": {"conf_thresh": 0.0},  # every pixel confident
        "unimatch": {"conf_thresh": 0.0},
        "vat": {"conf_thresh": 0.0},  # every pixel in the consistency term
        "cutmix_seg": {"conf_thresh": 0.0},  # the whole batch confident: the consistency at full weight
        "advsemseg": {"semi_start": 0.0, "semi_thresh": 0.0},  # loss_semi from step 0, every pixel trusted
    }.get(name, {})


@pytest.mark.parametrize("name", METHODS.names())
def test_method_contract(name):
    method = build(name, **method_defaults(name))
    method.train()
    trainable = method.trainable_nets()
    trainable_ids = {id(p) for net in trainable.values() for p in net.parameters()}
    others = [p for p in method.parameters() if id(p) not in trainable_ids]
    teacher_before = [p.detach().clone() for p in others]

    losses = method.training_step(make_batch(type(method)), step=0)
    assert "loss" in losses and all(v.dim() == 0 for v in losses.values())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    declared = type(method).loss_terms
    undeclared = [k for k, v in losses.items() if v.requires_grad and k != "loss" and k not in declared]
    assert not undeclared, f"terms with gradient that loss_terms does not declare: {undeclared}"
    for term, nets in declared.items():
        assert term in losses, f"declared term {term} not returned"
        for net_name in trainable:
            params = [p for p in trainable[net_name].parameters() if p.requires_grad]
            grads = torch.autograd.grad(losses[term], params, retain_graph=True, allow_unused=True)
            reached = any(g is not None and g.abs().sum() > 0 for g in grads)
            assert reached == (net_name in nets), f"{term} {'does not reach' if reached is False else 'reaches'} {net_name}"
    losses["loss"].backward()
    for net_name, net in trainable.items():
        head = [p for p in net.head_parameters() if p.requires_grad]
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head), f"{net_name} got no gradient"
    for p in others:
        assert p.grad is None, "a non-trainable module (teacher) received gradient"

    # one optimizer-like update, then EMA must move teachers towards the student
    with torch.no_grad():
        for p in method.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    method.after_step(0)
    method.after_step(1)
    if others:
        assert any(not torch.equal(a, b) for a, b in zip(teacher_before, others)), "EMA did not move the teacher"

    # checkpoint round trip: a fresh method loading the state computes the same losses
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    clone = build(name, **method_defaults(name))
    clone.load_state_dict(torch.load(buf, weights_only=True))
    clone.train()
    for (k, a), b in zip(method.state_dict().items(), clone.state_dict().values()):
        if isinstance(a, dict):  # a submodule's extra state (a label store)
            assert a.keys() == b.keys() and all(torch.equal(a[f], b[f]) for f in a), k
        else:
            assert torch.equal(a, b), k
    batch = make_batch(type(method), seed=1)
    torch.manual_seed(5)
    la = method.training_step(batch, step=2)
    torch.manual_seed(5)
    lb = clone.training_step(batch, step=2)
    for k in la:
        assert torch.allclose(la[k], lb[k], atol=1e-5, equal_nan=True), k


def stream_config(method_cls) -> dict:
    """Tiny streams for a method: ``unlabeled`` and label-store streams read no masks."""
    return {name: {"split": "train", "batch_size": 4,
                   "labeled": name not in ("unlabeled",) and name not in method_cls.label_store_streams}
            for name in method_cls.streams}  # (a label-store stream's images have masks: gt annotators)


@pytest.mark.parametrize("name", METHODS.names())
def test_method_trains_through_an_evaluation_keeping_every_modules_mode(name, tiny_cfg, monkeypatch):
    """The last stage of the method's pipeline (the one Trainer runs), 4 steps, an evaluation after 2."""
    from lesseg.engine.trainer import Trainer

    method_cls = METHODS.get(name)
    cfg = tiny_cfg(["train.iters=4", "train.eval_every=2"], method={"name": name, **method_defaults(name)},
                   data={"streams": stream_config(method_cls)})
    trainer = Trainer(cfg)
    modes = []
    original = trainer.method.training_step

    def record(batch, step):
        modes.append(tuple(m.training for m in trainer.method.modules()))
        return original(batch, step)

    monkeypatch.setattr(trainer.method, "training_step", record)
    result = trainer.fit()
    assert 0.0 <= result["score"] <= 1.0 and result["metric"] in result
    assert len(modes) == 4 and len(set(modes)) == 1, "a module changed mode across the evaluation"
