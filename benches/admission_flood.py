"""How long a member takes to connect to a parameter server while outsiders flood it.

    python3 benches/admission_flood.py [ROUNDS]

Starts a parameter server (`python -m tandem ps`, the installed wheel; mutual TLS with the job's
certificates made by `tandem certs init`), then times a worker's connection (a `tandem.ps.Client`:
TCP, TLS handshake, the declaration) ROUNDS times without a flood and ROUNDS times while 64 idle
sockets stay open on the server's port and a thread opens and closes connections to it as fast
as it can. Prints `admission,<flood>,<median ms>,<max ms>` per case. Speed is measured here, never
in tests (tests/tests/admission.rs checks that members get in at all).
"""

from __future__ import annotations

import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import tandem.ps as ps


def serve(env: dict) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-m", "tandem", "ps", "--bind", "127.0.0.1:0", "--keep-running"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert p.stdout is not None
    line = p.stdout.readline()
    return p, line.rsplit(" ", 1)[-1].strip()


def connect_ms(addr: str, token: str, worker: int) -> float:
    t0 = time.perf_counter()
    c = ps.Client([ps.param("w", (4,))], servers=[addr], worker=worker, workers=1000, token=token, timeout=30)
    took = (time.perf_counter() - t0) * 1e3
    del c
    return took


def flood(addr: str, stop: threading.Event) -> list:
    host, port = addr.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port))) for _ in range(64)]

    def churn() -> None:
        while not stop.is_set():
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
            except OSError:
                pass

    threading.Thread(target=churn, daemon=True).start()
    return idle


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory() as d:
        for who in ("ps-0", "worker-0"):
            subprocess.run([sys.executable, "-m", "tandem", "certs", "init", d, "--identity", who,
                            "--out", os.path.join(d, who)], check=True, capture_output=True)
        env = dict(os.environ, TANDEM_JOB_TOKEN=token, TANDEM_TLS_DIR=os.path.join(d, "ps-0"))
        server, addr = serve(env)
        os.environ["TANDEM_TLS_DIR"] = os.path.join(d, "worker-0")
        try:
            quiet = [connect_ms(addr, token, i) for i in range(rounds)]
            stop = threading.Event()
            idle = flood(addr, stop)
            time.sleep(0.5)
            loud = [connect_ms(addr, token, rounds + i) for i in range(rounds)]
            stop.set()
            for s in idle:
                s.close()
        finally:
            server.kill()
            server.wait()
    for name, v in (("none", quiet), ("64-idle+churn", loud)):
        print(f"admission,{name},{statistics.median(v):.1f},{max(v):.1f}", flush=True)


if __name__ == "__main__":
    main()
