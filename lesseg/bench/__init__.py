"""Experiment harnesses that print tables (``lesseg bench``); they call the library's public API only.

Figures go into docs/benchmarks.md together with the command that produced them; they are not unit tests.

- ``speed``: training throughput and peak memory of one config, or its profiler table (``bench speed``)
- ``semi``: accuracy per label budget, method x budget x seed, summarised per method (``bench semi``)
- ``pretrain``: the synthetic-domain encoder the semi runs start from (``bench semi --pretrain``)
- ``cost``: a method's step against the network passes it needs (``bench semi``'s cost lines)
- ``select``: RIPU's scores and selection time for one image (``bench select``)
- ``runs``: train or reuse a run folder, read back its logs; ``measure``: trainer mid-schedule, peak memory
"""

from .cost import bench_costs, bench_overhead, record_passes
from .pretrain import pretrain_synthetic
from .select import bench_select, print_select_table
from .semi import SEMI_METHODS, bench_semi, print_semi_table, summarize_semi
from .speed import bench_speed, print_speed_table, profile_steps

__all__ = [
    "SEMI_METHODS",
    "bench_costs",
    "bench_overhead",
    "bench_select",
    "bench_semi",
    "bench_speed",
    "pretrain_synthetic",
    "print_select_table",
    "print_semi_table",
    "print_speed_table",
    "profile_steps",
    "record_passes",
    "summarize_semi",
]
