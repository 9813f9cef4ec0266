"""Open MPI's MPI_Allreduce through mpi4py, timed like `tandem bench allreduce`.

Run under mpirun, e.g.
  mpirun -np 2 --mca pml ob1 --mca btl tcp,self --mca btl_tcp_if_include lo python3 allreduce_mpi.py 4096 67108864
Prints one CSV line per size on rank 0: peer,ranks,size,time_us,busbw_gbs
"""
import sys
import time

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, n = comm.Get_rank(), comm.Get_size()
label = sys.argv[1]
for size in (int(s) for s in sys.argv[2:]):
    count = size // 4
    buf = np.full(count, rank + 1, dtype=np.float32)
    out = np.empty_like(buf)
    comm.Allreduce(buf, out, op=MPI.SUM)
    assert out[0] == n * (n + 1) / 2, out[0]
    iters = 10 if size >= 16 << 20 else 30 if size >= 1 << 20 else 200
    for _ in range(3):
        comm.Allreduce(buf, out, op=MPI.SUM)
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        comm.Allreduce(buf, out, op=MPI.SUM)
    per = (time.perf_counter() - t0) / iters
    per = comm.allreduce(per, op=MPI.MAX)
    if rank == 0:
        busbw = size / per / 1e9 * 2 * (n - 1) / n
        print(f"{label},{n},{size},{per * 1e6:.1f},{busbw:.3f}", flush=True)
