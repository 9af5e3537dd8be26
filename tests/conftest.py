"""Suite-wide test set-up.

One BLAS/OpenMP thread per process: the suite runs tiny tensors on a shared 2-core machine,
where several threads per process only fight each other (set before torch is imported;
an explicit OMP_NUM_THREADS in the environment wins). Subprocesses inherit it.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
