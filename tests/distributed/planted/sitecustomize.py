"""Planted defect for tests/distributed/test_doctor.py: on rank 1 only, a kernel block shape Triton cannot compile."""

import os

if os.environ.get("RANK") == "1":
    import megamoe_kernels.lory as kernels

    kernels._block = lambda size, cap: 48
