"""The standard Ray parameter-server pattern, timed like `tandem bench ps`.

  python3 ps_ray.py PARAMS WORKERS SHARDS sync|async STEPS [ADDRESS HOSTS]
PS actors hold shards; workers pull every shard, compute a trivial gradient, push.
Sync: each step the shards average one gradient per worker. Async: each worker loops on its own.
With ADDRESS and HOSTS it joins a running Ray cluster whose node i has the custom resource
`tandem_host_<i>` (benches/peers/ray_node.sh on `tandem testbed`) and places shard i on host
i mod HOSTS and worker w on host (SHARDS + w) mod HOSTS, as `tandem bench ps --hosts` places its
servers and workers. Without them it starts Ray on this machine.
Prints CSV: ray,mode,workers,shards,params,rate,gb_s  (rate: global steps/s for sync, gradients/s for async)
"""
import sys
import time

import numpy as np
import ray

params, workers, shards, mode, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
address, hosts = (sys.argv[6], int(sys.argv[7])) if len(sys.argv) > 7 else (None, 0)
if address:
    ray.init(address=address, logging_level="ERROR")
    # Every host's node must have joined before anything is placed (bounded: 120 s).
    deadline = time.monotonic() + 120
    while sum(1 for n in ray.nodes() if n["Alive"]) < hosts:
        if time.monotonic() > deadline:
            sys.exit(f"ps_ray.py: only {sum(1 for n in ray.nodes() if n['Alive'])} of {hosts} Ray nodes joined within 120 s")
        time.sleep(0.5)
else:
    ray.init(num_cpus=workers + shards, include_dashboard=False, logging_level="ERROR")
sizes = [params // shards + (1 if i < params % shards else 0) for i in range(shards)]


def on_host(i):
    """Actor options placing it on simulated host i (cluster mode), or anywhere."""
    return {"resources": {f"tandem_host_{i % hosts}": 1}} if address else {}


@ray.remote
class Shard:
    def __init__(self, n):
        self.w = np.zeros(n, np.float32)

    def get(self):
        return self.w

    def apply(self, *grads):
        self.w -= 0.01 * (sum(grads) / len(grads))
        return self.w

    def apply_one(self, g):
        self.w -= 0.01 * g
        return True


@ray.remote
class Worker:
    def grad(self, *weights):
        out = [w * 0.001 + 0.001 for w in weights]
        return out[0] if len(out) == 1 else tuple(out)

    def run(self, shard_actors, steps):
        for _ in range(steps):
            ws = ray.get([s.get.remote() for s in shard_actors])
            ray.get([s.apply_one.remote(w * 0.001 + 0.001) for s, w in zip(shard_actors, ws)])
        return True


ps = [Shard.options(**on_host(i)).remote(n) for i, n in enumerate(sizes)]
ws = [Worker.options(**on_host(shards + w)).remote() for w in range(workers)]
ray.get([p.get.remote() for p in ps])
ray.get([w.grad.remote(np.zeros(1)) for w in ws])

t0 = time.perf_counter()
if mode == "sync":
    weights = [p.get.remote() for p in ps]
    for _ in range(steps):
        grads = [w.grad.options(num_returns=shards).remote(*weights) for w in ws]
        if shards == 1:
            grads = [[g] for g in grads]
        weights = [ps[i].apply.remote(*[g[i] for g in grads]) for i in range(shards)]
    ray.get(weights)
    wall = time.perf_counter() - t0
    rate = steps / wall
else:
    ray.get([w.run.remote(ps, steps) for w in ws])
    wall = time.perf_counter() - t0
    rate = workers * steps / wall
gbs = workers * steps * params * 4 * 2 / wall / 1e9
print(f"ray,{mode},{workers},{shards},{params},{rate:.3f},{gbs:.3f}", flush=True)
ray.shutdown()
