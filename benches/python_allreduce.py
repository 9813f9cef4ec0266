"""Tandem's allreduce driven from Python, timed exactly like `tandem bench allreduce`.

    python -m tandem.launch --nproc N --no-log-files --no-prefix -- python benches/python_allreduce.py SIZE [SIZE ...]
Rank 0 prints one CSV line per size: peer,ranks,size,time_us,busbw_gbs
"""
import sys
import time

import numpy as np

import tandem


def iterations(size: int) -> int:
    # The same counts `tandem bench` uses for these sizes.
    return 10 if size >= 16 << 20 else 30 if size >= 1 << 20 else 200


def main() -> None:
    sizes = [int(s) for s in sys.argv[1:]]
    with tandem.init(timeout=120) as g:
        n = g.world_size
        for size in sizes:
            a = np.full(size // 4, float(g.rank + 1), dtype=np.float32)
            g.allreduce(a)
            assert a[0] == n * (n + 1) / 2
            for _ in range(3):
                g.allreduce(a)
            g.barrier()
            iters = iterations(size)
            t0 = time.perf_counter()
            for _ in range(iters):
                g.allreduce(a)
            per = np.array([(time.perf_counter() - t0) / iters])
            g.allreduce(per, op="max")
            if g.rank == 0:
                busbw = size / per[0] / 1e9 * 2 * (n - 1) / n
                print(f"tandem-python,{n},{size},{per[0] * 1e6:.1f},{busbw:.3f}", flush=True)


if __name__ == "__main__":
    main()
