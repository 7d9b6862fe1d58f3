"""torch.distributed glue: a no-op in one process, DDP when launched by torchrun (architecture.md, item 8)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """Rank 0, also after the process group is gone (torchrun's RANK then tells), so that a command's final
    output is printed once, not once per process."""
    return rank() == 0 if is_dist() else int(os.environ.get("RANK", "0")) == 0


def init(device: str = "auto") -> torch.device:
    """Pick the device; join the process group when torchrun's environment is present (nccl/gloo)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda":
        device = f"cuda:{local}"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not is_dist():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return dev


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor of the same shape from every process along dim 0 (identity in one process)."""
    if not is_dist():
        return t
    out = [torch.empty_like(t) for _ in range(world())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup(finished: bool = False) -> None:
    """Leave the process group. ``finished`` (a normal end): first wait for every process, so that none
    exits while a peer still tears down its connections; after an error, leave at once (the others may never
    arrive). Objects that hold the group (DDP modules) must be gone by then: a group they keep alive is
    destroyed at interpreter exit with its gloo threads still running, which aborts the process ("terminate
    called without an active exception", seen in the two-process tests); the garbage collection here frees
    the ones only cycles still hold."""
    if is_dist():
        import gc

        gc.collect()
        if finished:
            dist.barrier()
        dist.destroy_process_group()
