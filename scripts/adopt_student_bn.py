"""Bring a run trained with ``method.teacher_bn=weak`` before the teacher's running BatchNorm statistics were
copied from the student (docs/benchmarks.md, "The evaluated teacher's BatchNorm statistics") to what the
current code saves: last.pt with the teacher's running statistics replaced by the student's, and its final
evaluation redone.

Training itself was not changed by that statistics policy while ``teacher_bn=weak`` was in force: the teacher
labels with the batch statistics of the weak views, and its running statistics enter no training step. But
until the evaluation mode fix (issue 16) ``teacher_bn=weak`` was in force only up to the first periodic
evaluation, which put the whole teacher, BatchNorm layers included, in eval mode for the rest of the run: from
then on the teacher labelled with its running statistics (the student's, under the policy above). Runs made
before that fix therefore differ from what today's code trains, and the rewritten last.pt is only the
evaluation of such a run redone with the student's statistics; intermediate evaluations and best.pt are not
redone. docs/benchmarks.md has the rows retrained with the fix.

    python scripts/adopt_student_bn.py RUN_DIR [RUN_DIR ...]           # old and new mIoU, nothing written
    python scripts/adopt_student_bn.py --write RUN_DIR [RUN_DIR ...]   # also rewrite last.pt, log the eval
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lesseg.data import build_eval_dataset, eval_loader
from lesseg.engine import checkpoint as ckpt
from lesseg.engine.evaluate import evaluate
from lesseg.engine.inference import load_checkpoint_method


def adopt(run: Path, write: bool) -> None:
    path = run / "last.pt"
    method, cfg, info, state = load_checkpoint_method(path)
    if cfg.method.get("teacher_bn") != "weak":
        print(f"{run}: teacher_bn={cfg.method.get('teacher_bn')}, nothing to do")
        return
    (student,) = method.trainable_nets().values()
    teacher = method.teacher
    with torch.no_grad():
        for t, s in zip(teacher.buffers(), student.buffers()):
            t.copy_(s)
    net = method.eval_net()
    loader = eval_loader(build_eval_dataset(cfg.data, check=False), cfg.eval.batch_size, 0, 1, cfg.data.workers)
    result = evaluate(net, loader, info.num_classes, cfg.eval, list(cfg.data.crop_size), torch.device("cpu"),
                      info.class_names)
    evaluated = "teacher" if net is teacher else "student"
    print(f"{run}: step {state['step']}, evaluated {evaluated}: mIoU {100 * state['eval']['miou']:.2f} -> "
          f"{100 * result['miou']:.2f}")
    if write and net is teacher:
        prefix = next(name for name, m in method.named_children() if m is teacher)
        for key, value in teacher.state_dict().items():
            state["method"][f"{prefix}.{key}"] = value
        state["eval"] = result
        ckpt.save_atomic(state, path)
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"event": "eval", "step": state["step"], **result,
                                "note": "scripts/adopt_student_bn.py: teacher with the student's statistics"}) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    for run in args.runs:
        adopt(run, args.write)


if __name__ == "__main__":
    main()
