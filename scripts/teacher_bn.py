"""Which part of an EMA teacher makes its mIoU: its weights or its BatchNorm statistics.

For a checkpoint of a student/teacher method (Mean Teacher, CutMix-Seg, U2PL) prints the validation mIoU of
the student, the teacher, the teacher's weights with the student's running statistics and the student's
weights with the teacher's; with --recalibrate SPLIT also both networks with running statistics
re-estimated on the images of SPLIT (no augmentation, cumulative average), and with each validation
batch's own statistics.

    python scripts/teacher_bn.py runs/x/last.pt [--recalibrate unlabeled_1-8]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from lesseg.data import build_eval_dataset, eval_loader
from lesseg.engine.evaluate import evaluate
from lesseg.engine.inference import load_checkpoint_method
from lesseg.methods.common import batchnorm_train


def with_buffers(net: nn.Module, source: nn.Module) -> nn.Module:
    out = copy.deepcopy(net)
    with torch.no_grad():
        for a, b in zip(out.buffers(), source.buffers()):
            a.copy_(b)
    return out


def recalibrated(net: nn.Module, loader) -> nn.Module:
    out = copy.deepcopy(net).eval()
    for m in out.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over all batches
    batchnorm_train(out, True)
    with torch.no_grad():
        for batch in loader:
            out(batch["image"])
    return out.eval()


class BatchStatistics(nn.Module):
    """``net`` normalising every batch it sees with that batch's statistics (nothing is updated)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = copy.deepcopy(net)

    def forward(self, x: torch.Tensor) -> dict:
        batchnorm_train(self.net, True)
        return self.net(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--recalibrate", metavar="SPLIT")
    args = p.parse_args()
    method, cfg, info, state = load_checkpoint_method(args.checkpoint)
    (student,) = method.trainable_nets().values()
    teacher = method.teacher
    val = eval_loader(build_eval_dataset(cfg.data, check=False), cfg.eval.batch_size, 0, 1, 0)

    def miou(net: nn.Module) -> str:
        r = evaluate(net.eval(), val, info.num_classes, cfg.eval, list(cfg.data.crop_size), torch.device("cpu"),
                     info.class_names, progress=False)
        return f"{100 * r['miou']:.2f}"

    rows = [("student", miou(student)), ("teacher", miou(teacher)),
            ("teacher weights, student statistics", miou(with_buffers(teacher, student))),
            ("student weights, teacher statistics", miou(with_buffers(student, teacher)))]
    if args.recalibrate:
        loader = eval_loader(build_eval_dataset(cfg.data, split=args.recalibrate, check=False), 32, 0, 1, 0)
        rows += [(f"teacher, statistics of {args.recalibrate}", miou(recalibrated(teacher, loader))),
                 (f"student, statistics of {args.recalibrate}", miou(recalibrated(student, loader))),
                 ("teacher, each val batch's statistics", miou(BatchStatistics(teacher))),
                 ("student, each val batch's statistics", miou(BatchStatistics(student)))]
    print(f"{args.checkpoint} (step {state['step']})")
    for name, value in rows:
        print(f"  {name:<40s} {value}")


if __name__ == "__main__":
    main()
