"""The wave-2 methods under torchrun with two CPU processes (gloo), each through ``lesseg train`` on tiny
shapes data: semi-supervised CCT, VAT, AdvSemSeg, PseudoSeg, GCT, U2PL + AEL, FixMatch, UniMatch and the weak
pipelines AE, PSL+ (with the dense CRF), STC and MIL (marked slow: about 10-20 s each on a free core).

A run passes when it exits 0 without gloo's "terminate called" abort (a DDP module alive at the group's
destruction) or a hang (300 s), prints its result once, logs finite losses only, and its checkpoint loads
into a freshly built method. The probe below wraps every training stage's ``Trainer.fit``: after each
optimizer step it takes a digest of every parameter (student, EMA teacher, discriminator, detector, ...) and
every buffer but BatchNorm running statistics (on CPU, without SyncBN, each process's drift apart between
DDP's broadcasts by design, and the trainer gives every process rank 0's before evaluating and saving), and
at the stage's end the processes compare them step by step, then their whole state (statistics included).
So a parameter that misses DDP's gradient averaging, a memory bank or class-confidence bank that one process
updates alone, or a teacher updated from a process's own weights fails the test by name. The task stages
of the pipelines write their products as shards: every image of a product has its mask.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import json, sys
import torch
from lesseg import dist
from lesseg.cli import main
from lesseg.engine import trainer as T

BN_STATS = ("running_mean", "running_var")
report = sys.argv[1]
fit = T.Trainer.fit


def digest(tensors):
    return torch.stack([t.detach().double().sum() + t.detach().double().abs().sum() for t in tensors])


def checked_fit(self):
    m = self.method
    named = list(m.named_parameters()) + [(n, b) for n, b in m.named_buffers() if not n.endswith(BN_STATS)]
    steps = []
    after_step = m.after_step

    def record(step):
        after_step(step)
        steps.append(digest([t for _, t in named]))

    m.after_step = record
    try:
        result = fit(self)
    finally:
        del m.after_step
    every = dist.all_gather_cat(torch.stack(steps).unsqueeze(0))  # world, steps, tensors
    state = {k: v for k, v in m.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}
    final = dist.all_gather_cat(digest(list(state.values())).unsqueeze(0))  # world, tensors
    if dist.is_main():
        differ = sorted({named[i][0] for i in (every != every[0]).any(0).any(0).nonzero().flatten().tolist()})
        final_differ = [list(state)[i] for i in (final != final[0]).any(0).nonzero().flatten().tolist()]
        with open(report, "a") as f:
            f.write(json.dumps({"out": str(self.out), "steps": len(steps), "differ": differ,
                                "final_differ": final_differ}) + "\\n")
    return result


T.Trainer.fit = checked_fit
sys.exit(main(["train", *sys.argv[2:]]))
"""

SEMI = ["data.streams.labeled.split=labeled_1-4", "data.streams.unlabeled.split=unlabeled_1-4",
        "data.streams.labeled.batch_size=4", "data.streams.unlabeled.batch_size=4"]
WEAK = ["data.streams.labeled.batch_size=4", "stages.classifier.train.iters=3"]
# config, overrides: small settings under which every branch runs in 4 steps on 12 labeled + 36 unlabeled images
CASES = {
    "cct": ("shapes/cct.yaml", SEMI),
    "vat": ("shapes/vat.yaml", [*SEMI, "method.conf_thresh=0.0"]),  # every pixel in the consistency term
    "advsemseg": ("shapes/advsemseg.yaml", [*SEMI, "method.semi_start=0.0"]),  # loss_semi from step 0
    "pseudoseg": ("shapes/pseudoseg.yaml", SEMI),
    "gct": ("shapes/gct.yaml", [*SEMI, "method.fd_channels=8"]),
    # 4 steps an epoch under two processes: supervised warm-up for steps 0-3, the teacher's handover at 4,
    # the contrastive loss (bank gathered from both processes) from step 4
    "u2pl_ael": ("shapes/u2pl_ael.yaml", [*SEMI, "train.iters=6", "train.eval_every=3", "method.sup_only_epochs=1",
                                          "method.contra_start_epochs=1", "method.num_queries=4",
                                          "method.num_negatives=4", "method.bank_size=32", "method.bank_size_bg=32"]),
    # distribution alignment's running priors and shift must be the same on both processes (they were per process)
    "mean_teacher_align": ("shapes/mean_teacher.yaml", [*SEMI, "method.align=hard"]),
    # CPS's default alignment: each network's running shift the same on both processes
    "cps": ("shapes/cps.yaml", SEMI),
    "fixmatch": ("shapes/fixmatch.yaml", [*SEMI, "method.conf_thresh=0.0"]),
    "unimatch": ("shapes/unimatch.yaml", [*SEMI, "method.conf_thresh=0.0"]),
    # two erasing steps, both mining (erased images written for the second classifier)
    "ae": ("shapes/weak_ae.yaml", [*WEAK, "method.steps=2", "method.stop_loss=null"]),
    "psl": ("shapes/weak_psl_plus.yaml", [*WEAK, "method.plus=true", "method.crf=true", "method.steps=2"]),
    "stc": ("shapes/weak_stc.yaml", ["data.streams.labeled.batch_size=4", "stages.initial.train.iters=3",
                                     "stages.enhanced.train.iters=3"]),
    "mil": ("shapes/weak_mil.yaml", [*WEAK, "method.max_proposals=8", "method.proposal_batch=8"]),
}


@pytest.fixture(scope="module")
def shapes_48(tmp_path_factory):
    """Tiny shapes data (48 training, 16 val images), generated once, in this one process."""
    from lesseg.data import build_source

    root = tmp_path_factory.mktemp("data") / "shapes"
    build_source("shapes", str(root), {"n_train": 48, "n_val": 16, "size": 32})
    return root


def _losses_finite(out: Path) -> int:
    """Assert every logged loss of every training in ``out`` (stages included) is finite; returns how many."""
    n = 0
    for log in out.rglob("metrics.jsonl"):
        for record in map(json.loads, log.read_text().splitlines()):
            if record["event"] == "train":
                losses = {k: v for k, v in record.items() if k.startswith("loss")}
                assert all(math.isfinite(v) for v in losses.values()), (log, record)
                n += len(losses)
    return n


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_train_in_step(name, shapes_48, tmp_path):
    from lesseg import config
    from lesseg.engine import checkpoint as ckpt
    from lesseg.methods import RunInfo, build_method

    if name == "psl":
        from lesseg.methods.weak.crf import crf_missing

        if crf_missing():
            pytest.skip(crf_missing())
    path, overrides = CASES[name]
    out, report = tmp_path / "run", tmp_path / "probe.jsonl"
    (tmp_path / "probe.py").write_text(PROBE)
    args = [path, "train.iters=4", "train.eval_every=2", "train.log_every=1", "train.progress=false",
            "train.device=cpu", f"data.root={shapes_48}", "data.options={n_train: 48, n_val: 16, size: 32}",
            "data.crop_size=[32,32]", "data.workers=0", "model.encoder=test_resnet", "model.decoder_channels=16",
            "model.rep_dim=16", "model.pretrained=null", f"out={out}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(tmp_path / "probe.py"), str(report), *args],
                       capture_output=True, text=True, env=env, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-1000:] + r.stderr[-4000:]
    assert "terminate called" not in r.stderr, r.stderr[-4000:]
    results = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert len(results) == 1 and 0.0 <= results[0]["miou"] <= 1.0, r.stdout  # printed once, not per process

    # every training stage: the same weights on both processes after every step, the same state at its end
    stages = [json.loads(x) for x in report.read_text().splitlines()]
    status = json.loads((out / "stages.json").read_text()) if (out / "stages.json").is_file() else None
    trained = 1 if status is None else sum(s["kind"] == "train" and s["state"] == "done" for s in status)
    assert len(stages) == trained, stages
    for s in stages:
        assert s["steps"] > 0 and not s["differ"] and not s["final_differ"], s
    assert _losses_finite(out) > 0

    # the run's checkpoint loads into the method its config builds
    state = ckpt.load(out / "last.pt")
    method = build_method(config.load(out / "config.yaml"), RunInfo(**state["info"]))
    method.load_state_dict(state["method"])

    # pipelines: each process wrote its shard of every task stage's masks, together all of them
    for s in status or []:
        product = Path(s["product"])
        if s["kind"] == "task" and s["state"] == "done":
            stems = (product / "splits" / "train.txt").read_text().split()
            assert stems and sorted(p.stem for p in (product / "masks").iterdir()) == sorted(stems), s["stage"]
