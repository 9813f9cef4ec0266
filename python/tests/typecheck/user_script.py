"""A training script as a user writes it, type-checked with ``mypy --strict`` in CI (test_typing.py).

It is never run: it exists so that the public API's annotations (and ``tandem._native``'s stubs)
are complete enough for a strictly typed caller.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

import tandem
import tandem.elastic
import tandem.ps


def collectives() -> float:
    group: tandem.Group = tandem.init(timeout=30.0)
    x = np.ones(4, dtype=np.float32) * (group.rank + 1)
    summed: np.ndarray = tandem.allreduce(x, op="sum")
    gathered: np.ndarray = tandem.allgather(x)
    tandem.broadcast(x, root=0)
    work: tandem.Work = tandem.allreduce_async(x)
    work.wait()
    tandem.barrier()
    spec: dict = tandem.cluster_spec()  # type: ignore[type-arg]
    assert spec
    return float(summed.sum() + gathered.sum()) + tandem.rank() + tandem.world_size()


def optimizer() -> None:
    params: List[np.ndarray] = [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)]
    tandem.broadcast_parameters(params, root=0)
    opt = tandem.DistributedOptimizer(tandem.optim.SGD(lr=0.1))
    grads = [np.ones_like(p) for p in params]
    opt.step(params, grads)


def parameter_servers() -> Optional[float]:
    client = tandem.ps.Client([tandem.ps.param("w", [4, 2]), tandem.ps.param("b", [2])], optimizer="sgd", lr=0.1)
    step, params = client.pull()
    grads: Dict[str, np.ndarray] = {name: np.ones_like(v) for name, v in params.items()}
    result: tandem.ps.PushResult = client.push(step, grads)
    client.done()
    return float(result.version) if result.applied else None


@tandem.elastic.run
def train(state: tandem.elastic.State) -> int:
    try:
        tandem.allreduce(np.ones(2))
    except tandem.PeerLostError as e:
        print("lost", e.rank)
    state.commit()
    return tandem.rank()


if __name__ == "__main__":
    collectives()
    optimizer()
    parameter_servers()
    train(tandem.elastic.State(epoch=0))
    print(tandem.metrics_text())
