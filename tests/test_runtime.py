"""Process settings of ddpm.runtime: reusing freed memory instead of faulting in fresh pages."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MIB = 48  # above glibc's largest dynamic mmap threshold (32 MiB)

# Run in a child process: the allocator setting is process-wide and cannot be undone.
PROBE = textwrap.dedent(f"""
    import resource
    import torch
    from ddpm.runtime import reuse_freed_memory

    def faults_per_allocation():
        # minor page faults of one {MIB} MiB tensor allocated, written and freed: the median
        # of 5 after 15 more (the heap settles over the first few)
        counts = []
        for _ in range(20):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            torch.empty({MIB} * 2**18).fill_(1.0)
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return sorted(counts[-5:])[2]

    default = faults_per_allocation()
    took = reuse_freed_memory()
    print(took, default, faults_per_allocation())
""")


def test_reusing_freed_memory_stops_the_page_faults_of_repeated_large_allocations():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout.split()
    took, default, reused = out[0] == "True", int(out[1]), int(out[2])
    if not took:
        pytest.skip("this C library has no mallopt")
    pages = MIB * 2**20 // 4096
    if default < pages // 2:
        pytest.skip(f"{default} faults for {pages} pages by default: huge pages or another "
                    "allocator already reuse the memory")
    assert reused * 10 < default, (default, reused)


def test_reusing_freed_memory_leaves_a_gpu_run_alone():
    import torch

    from ddpm.runtime import reuse_freed_memory

    assert reuse_freed_memory(torch.device("cuda")) is False
