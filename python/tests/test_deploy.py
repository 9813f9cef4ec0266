"""The deployment files: manifests carry what the Kubeflow operators require, and the exact
environment the operators and Slurm produce resolves to the right roles, ranks and addresses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

from conftest import ROOT, clean_env

yaml = pytest.importorskip("yaml")

DEPLOY = ROOT / "deploy"
SPEC = "import json, tandem; print(json.dumps(tandem.cluster_spec()))"


def resolve(env: Dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", SPEC], env=clean_env(**env), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def containers(replica: dict) -> list:
    return replica["template"]["spec"]["containers"]


def token_from_secret(container: dict, job: str) -> bool:
    """The container reads TANDEM_JOB_TOKEN from the Secret named after its job (`<job>-token`)."""
    return any(e["name"] == "TANDEM_JOB_TOKEN" and e["valueFrom"]["secretKeyRef"]["name"] == f"{job}-token"
               for e in container.get("env", []))


def test_tfjob_manifest_has_what_the_training_operator_requires() -> None:
    job = yaml.safe_load((DEPLOY / "kubernetes" / "tfjob-ps.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "TFJob")
    specs = job["spec"]["tfReplicaSpecs"]
    assert set(specs) == {"PS", "Worker"}
    for name, replica in specs.items():
        assert replica["replicas"] >= 1
        (c,) = containers(replica)
        assert c["name"] == "tensorflow"
        assert any(p["name"] == "tfjob-port" and p["containerPort"] == 2222 for p in c["ports"])
        assert token_from_secret(c, "tandem-ps"), name
    assert containers(specs["PS"])[0]["command"][:2] == ["tandem", "ps"]
    assert "nvidia.com/gpu" in containers(specs["Worker"])[0]["resources"]["limits"]


def test_pytorchjob_manifest_has_what_the_training_operator_requires() -> None:
    job = yaml.safe_load((DEPLOY / "kubernetes" / "pytorchjob-allreduce.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"} and specs["Master"]["replicas"] == 1
    for replica in specs.values():
        (c,) = containers(replica)
        assert c["name"] == "pytorch"
        assert any(p["name"] == "pytorchjob-port" for p in c["ports"])
        assert token_from_secret(c, "tandem-allreduce")
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_elastic_pytorchjob_has_a_rendezvous_that_outlives_its_workers() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "pytorchjob-elastic.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service", "PyTorchJob"}
    job, svc, rdv = kinds["PyTorchJob"], kinds["Service"], kinds["Deployment"]
    policy = job["spec"]["elasticPolicy"]
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Worker"}, "no Master: every replica is an equal, replaceable member"
    worker = specs["Worker"]
    assert policy["minReplicas"] <= worker["replicas"] <= policy["maxReplicas"]
    assert worker["restartPolicy"] == "OnFailure"
    (c,) = containers(worker)
    env = {e["name"]: e for e in c["env"]}
    value = lambda k: env[k].get("value")  # noqa: E731
    assert value("TANDEM_ELASTIC") == f"{policy['minReplicas']}:{policy['maxReplicas']}"
    assert value("TANDEM_WORLD_SIZE") == str(worker["replicas"])
    assert value("TANDEM_RENDEZVOUS_EXTERNAL") == "1" and value("TANDEM_LAUNCHER") == "tandem"
    index = env["REPLICA_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert "replica-index" in index
    assert value("TANDEM_ELASTIC_ID") == value("TANDEM_RANK") == "$(REPLICA_INDEX)"
    # The workers reach the rendezvous through the Service, which leads to the Deployment's pod.
    host, port = value("TANDEM_RENDEZVOUS_ADDR").rsplit(":", 1)
    assert host == svc["metadata"]["name"] == rdv["metadata"]["name"]
    assert svc["spec"]["selector"] == rdv["spec"]["template"]["metadata"]["labels"]
    assert int(port) == svc["spec"]["ports"][0]["port"]
    (r,) = rdv["spec"]["template"]["spec"]["containers"]
    assert r["command"][:2] == ["tandem", "rendezvous"]
    assert r["command"][r["command"].index("--bind") + 1] == f"$(POD_IP):{port}"
    assert token_from_secret(r, "tandem-elastic") and token_from_secret(c, "tandem-elastic")
    assert c["command"][0] == "elastic_data_parallel"
    assert (ROOT / "examples" / "elastic_data_parallel.rs").exists()


def test_secret_manifest_parses() -> None:
    s = yaml.safe_load((DEPLOY / "kubernetes" / "secret.yaml").read_text())
    assert s["kind"] == "Secret" and "token" in s["stringData"]


def test_tfjob_environment_resolves_every_replica() -> None:
    job = yaml.safe_load((DEPLOY / "kubernetes" / "tfjob-ps.yaml").read_text())
    name = job["metadata"]["name"]
    specs = job["spec"]["tfReplicaSpecs"]
    # TF_CONFIG as the training operator writes it: <job>-<type>-<i>.<namespace>.svc:<port>.
    cluster = {t.lower(): [f"{name}-{t.lower()}-{i}.default.svc:2222" for i in range(r["replicas"])]
               for t, r in specs.items()}
    workers, servers = len(cluster["worker"]), len(cluster["ps"])
    for t, addrs in cluster.items():
        for i in range(len(addrs)):
            tf = json.dumps({"cluster": cluster, "task": {"type": t, "index": i}})
            spec = resolve({"TF_CONFIG": tf})
            assert spec["source"] == "tf_config"
            assert (spec["role"], spec["index"]) == (t, i)
            assert spec["rank"] == (i if t == "worker" else workers + i)
            assert spec["world_size"] == workers + servers
            assert spec["peers"]["ps"]["1"] == f"{name}-ps-1.default.svc:2222"
            assert spec["rendezvous"] == f"{name}-worker-0.default.svc:2222"


def test_pytorchjob_environment_makes_worker_i_rank_i_plus_1() -> None:
    job = yaml.safe_load((DEPLOY / "kubernetes" / "pytorchjob-allreduce.yaml").read_text())
    name = job["metadata"]["name"]
    world = sum(r["replicas"] for r in job["spec"]["pytorchReplicaSpecs"].values())
    base = {"MASTER_ADDR": f"{name}-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": str(world),
            "PYTHONUNBUFFERED": "1"}
    assert resolve(dict(base, RANK="0"))["role"] == "chief"
    for i in range(world - 1):
        spec = resolve(dict(base, RANK=str(i + 1)))
        assert (spec["source"], spec["role"], spec["index"], spec["rank"]) == ("torchrun", "worker", i, i + 1)
        assert spec["rendezvous"] == f"{name}-master-0:23456"


def test_elastic_pytorchjob_environment_resolves_to_tandems_own_variables() -> None:
    docs = yaml.safe_load_all((DEPLOY / "kubernetes" / "pytorchjob-elastic.yaml").read_text())
    job = [d for d in docs if d["kind"] == "PyTorchJob"][0]
    (c,) = containers(job["spec"]["pytorchReplicaSpecs"]["Worker"])
    env = {e["name"]: e["value"].replace("$(REPLICA_INDEX)", "2") for e in c["env"] if "value" in e
           and "$(POD_IP)" not in e["value"]}
    # What the training operator injects for an elastic job, which Tandem must not be confused by.
    operator = {"PET_NNODES": "2:4", "PET_NPROC_PER_NODE": "1", "PET_RDZV_BACKEND": "c10d",
                "PET_RDZV_ENDPOINT": "tandem-elastic-worker-0:23456", "PET_MAX_RESTARTS": "10",
                "PYTHONUNBUFFERED": "1"}
    spec = resolve(dict(operator, **env))
    assert (spec["source"], spec["rank"], spec["world_size"]) == ("tandem", 2, 3)
    assert spec["rendezvous"] == "tandem-elastic-rendezvous:29400"


def test_slurm_allreduce_environment_uses_the_compressed_node_list() -> None:
    base = {"SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_TASKS_PER_NODE": "4(x2)",
            "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2"}
    spec = resolve(dict(base, SLURM_PROCID="5", SLURM_LOCALID="1", SLURM_NODEID="1"))
    assert (spec["source"], spec["rank"], spec["world_size"], spec["local_rank"]) == ("slurm", 5, 8, 1)
    assert spec["rendezvous"] == f"gpu07:{15000 + 4242 % 5000}"


def test_slurm_ps_tasks_get_the_tf_config_of_a_tfjob(tmp_path: Path) -> None:
    (tmp_path / "scontrol").write_text("#!/bin/sh\nprintf 'node01\\nnode02\\nnode03\\n'\n")
    (tmp_path / "tandem").write_text(f"#!/bin/sh\nexec {sys.executable} -c '{SPEC}'\n")
    for f in ("scontrol", "tandem"):
        (tmp_path / f).chmod(0o755)
    seen = []
    for task in range(6):
        env = clean_env(PATH=f"{tmp_path}:{clean_env()['PATH']}", SLURM_PROCID=str(task), SLURM_NTASKS="6",
                        SLURM_JOB_NODELIST="node[01-03]", SLURM_TASKS_PER_NODE="2(x3)", PS_COUNT="2",
                        TANDEM_PS_PORT="20000", TANDEM_PRINT_ONLY="1", TANDEM_BIN=str(tmp_path))
        out = subprocess.run([str(DEPLOY / "slurm" / "ps-task.sh")], env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        spec = json.loads(out.stdout)
        seen.append((spec["role"], spec["index"]))
        assert spec["peers"]["ps"] == {"0": "node01:20000", "1": "node01:20001"}
        assert spec["peers"]["worker"]["3"] == "node03:20001"
    assert seen == [("ps", 0), ("ps", 1), ("worker", 0), ("worker", 1), ("worker", 2), ("worker", 3)]


def test_sbatch_scripts_are_valid_bash() -> None:
    for script in (DEPLOY / "slurm").iterdir():
        if script.suffix in (".sbatch", ".sh"):
            assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0, script


def test_the_grafana_dashboard_queries_only_metrics_tandem_serves() -> None:
    import re

    dash = json.loads((DEPLOY / "grafana" / "tandem-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    used = {re.sub(r"_(bucket|count|sum)$", "", n) for e in exprs for n in re.findall(r"\btandem_\w+", e)}
    # What the code names: the registered families and the collectors' (counters gain _total):
    # the operation histograms, per-peer bytes and the parameter server's counters.
    sources = "\n".join((ROOT / "crates" / f).read_text() for f in (
        "tandem-observe/src/metrics/mod.rs", "tandem-observe/src/metrics/ops.rs",
        "tandem-observe/src/sockets.rs", "tandem-ps/src/server/metrics.rs"))
    served = set(re.findall(r"\btandem_[a-z_]+", sources))
    served |= {f"{n}_total" for n in served}
    assert used <= served, f"the dashboard asks for metrics nobody serves: {sorted(used - served)}"
    # Every panel filters by the job picked at the top.
    assert all('job="$job"' in e for e in exprs)
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "job"}


def test_every_trainer_pod_serves_metrics() -> None:
    for name in ("pytorchjob-allreduce.yaml", "tfjob-ps.yaml", "pytorchjob-elastic.yaml"):
        doc = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if d["kind"].endswith("Job")][0]
        replicas = doc["spec"].get("pytorchReplicaSpecs") or doc["spec"]["tfReplicaSpecs"]
        for role, spec in replicas.items():
            for c in containers(spec):
                ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
                assert "metrics" in ports, (name, role)
                env = {e["name"]: e for e in c.get("env", [])}
                serves = env.get("TANDEM_METRICS_ADDR", {}).get("value", "")
                if "--metrics-addr" in c["command"]:
                    serves = c["command"][c["command"].index("--metrics-addr") + 1]
                assert serves.endswith(f":{ports['metrics']}"), (name, role, serves)
                assert "TANDEM_JOB_NAME" in env, (name, role)


def test_nothing_listens_on_every_interface_and_every_pod_has_the_job_certificates() -> None:
    files = list((DEPLOY / "kubernetes").glob("*.yaml")) + list((DEPLOY / "slurm").iterdir())
    for f in files:
        text = f.read_text()
        assert "0.0.0.0" not in text and "[::]" not in text, f
    for name, key in (("tfjob-ps.yaml", "tfReplicaSpecs"), ("pytorchjob-allreduce.yaml", "pytorchReplicaSpecs"),
                      ("pytorchjob-elastic.yaml", "pytorchReplicaSpecs")):
        job = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if d["kind"].endswith("Job")][0]
        for role, replica in job["spec"][key].items():
            pod = replica["template"]["spec"]
            secrets = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
            for c in containers(replica):
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                tls_dir = env.get("TANDEM_TLS_DIR")
                if name == "pytorchjob-elastic.yaml":
                    # Elastic ranks are numbered anew at every re-formation: one certificate
                    # without a role, checked against the job's CA.
                    assert tls_dir, (name, role)
                    assert secrets.get(mounts.get(tls_dir)) == f"{job['metadata']['name']}-tls", (name, role)
                else:
                    # Each replica type mounts its own Secret, named after the job and the type.
                    ca = env["TANDEM_TLS_CA"]
                    mount = str(Path(ca).parent)
                    assert secrets.get(mounts.get(mount)) == f"{job['metadata']['name']}-tls-{role.lower()}", (name, role)
                    assert "TANDEM_TLS_DIR" not in env, (name, role)
                assert "TANDEM_INSECURE" not in env, (name, role)
                # A listening address is the pod's own.
                for v in list(env.values()) + c.get("command", []):
                    if v and ":" in str(v) and str(v).startswith("$("):
                        assert str(v).startswith("$(POD_IP):"), (name, role, v)


def expand(value: str, env: Dict[str, str]) -> str:
    """A container variable's value as the kubelet expands it: `$(NAME)` of a variable defined
    earlier in the list."""
    for k, v in env.items():
        value = value.replace(f"$({k})", v)
    assert "$(" not in value, value
    return value


@pytest.mark.parametrize("name,kind", [("tfjob-ps.yaml", "tfjob"), ("pytorchjob-allreduce.yaml", "pytorchjob")])
def test_every_replica_gets_its_own_certificate_from_the_secrets_the_manifest_says_to_make(
        name: str, kind: str, tmp_path: Path) -> None:
    """The command in the manifest's header makes the Secrets its pods mount; a pod of each replica
    type and index, with the files its Secret puts at the mount and its variables expanded as the
    kubelet does, loads a certificate naming its own role and index, and holds no other type's."""
    import base64
    import re

    text = (DEPLOY / "kubernetes" / name).read_text()
    job = [d for d in yaml.safe_load_all(text) if d["kind"].endswith("Job")][0]
    command = re.search(r"tandem certs kubernetes (tls [^|`]*)", text)
    assert command, name
    tandem = [sys.executable, "-m", "tandem"]
    init = re.search(r"tandem certs init (tls --job \S+)", text)
    assert init, name
    subprocess.run(tandem + ["certs", "init"] + init.group(1).split(), cwd=tmp_path, check=True,
                   capture_output=True, env=clean_env())
    out = subprocess.run(tandem + ["certs", "kubernetes"] + command.group(1).split(), cwd=tmp_path,
                         capture_output=True, text=True, env=clean_env())
    assert out.returncode == 0, out.stderr
    secrets = {d["metadata"]["name"]: d["data"] for d in yaml.safe_load_all(out.stdout) if d}
    assert not any("ca-key" in k for data in secrets.values() for k in data)
    spec = job["spec"]["tfReplicaSpecs" if kind == "tfjob" else "pytorchReplicaSpecs"]
    for role, replica in spec.items():
        pod = replica["template"]["spec"]
        volumes = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
        c = containers(replica)[0]
        for index in range(replica["replicas"]):
            # The files of the Secret this pod mounts, where it mounts them.
            root = tmp_path / f"{role}-{index}"
            env: Dict[str, str] = {}
            for m in c["volumeMounts"]:
                if m["name"] in volumes:
                    folder = root / m["mountPath"].lstrip("/")
                    folder.mkdir(parents=True)
                    for k, v in secrets[volumes[m["name"]]].items():
                        (folder / k).write_bytes(base64.b64decode(v))
            for e in c["env"]:
                if e["name"] == "TANDEM_REPLICA_INDEX":
                    assert "replica-index" in e["valueFrom"]["fieldRef"]["fieldPath"]
                    env[e["name"]] = str(index)
                elif "value" in e and e["name"].startswith("TANDEM_TLS"):
                    env[e["name"]] = str(root) + expand(e["value"], env)
            check = subprocess.run(tandem + ["certs", "check"], capture_output=True, text=True,
                                   env=clean_env(**env))
            assert check.returncode == 0, check.stderr
            want = {("tfjob", "PS"): f"ps-{index}", ("tfjob", "Worker"): f"worker-{index}",
                    ("tfjob", "Chief"): "chief", ("pytorchjob", "Master"): "rank-0",
                    ("pytorchjob", "Worker"): f"rank-{index + 1}"}[(kind, role)]
            assert f"identity: {want} of job {job['metadata']['name']}" in check.stdout, check.stdout
            # Only its own type's keys are in the pod.
            keys = [p.name for p in root.rglob("*-key.pem")]
            assert keys and all(k.startswith(role.lower() + "-") for k in keys), keys

