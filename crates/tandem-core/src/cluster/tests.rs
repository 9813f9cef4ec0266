//! Fixtures in each launcher's real format, good and malformed.

use super::*;

fn resolve(vars: &[(&str, &str)]) -> Result<ClusterSpec> {
    ClusterSpec::from_vars(vars)
}

fn config_error(vars: &[(&str, &str)], variable: &str, needle: &str) {
    match resolve(vars) {
        Err(Error::Config {
            variable: v,
            problem,
        }) => {
            assert_eq!(v, variable, "problem was: {problem}");
            assert!(
                problem.contains(needle),
                "{problem:?} should mention {needle:?}"
            );
        }
        other => panic!("expected a config error naming {variable}, got {other:?}"),
    }
}

const TFJOB: &str = r#"{"cluster":{"chief":["j-chief-0.ns.svc:2222"],"ps":["j-ps-0.ns.svc:2222","j-ps-1.ns.svc:2222"],"worker":["j-worker-0.ns.svc:2222","j-worker-1.ns.svc:2222"]},"task":{"type":"worker","index":1},"environment":"cloud"}"#;

#[test]
fn nothing_set_is_a_single_process() {
    let s = resolve(&[]).unwrap();
    assert_eq!(s.source(), Convention::SingleProcess);
    assert_eq!((s.rank(), s.world_size(), s.role()), (0, 1, Role::Chief));
    assert!(s.require_rendezvous().is_err());
}

#[test]
fn tf_config_tfjob_worker() {
    let s = resolve(&[("TF_CONFIG", TFJOB)]).unwrap();
    assert_eq!(s.source(), Convention::TfConfig);
    assert_eq!((s.role(), s.index()), (Role::Worker, 1));
    // chief, worker 0, worker 1, ps 0, ps 1
    assert_eq!((s.rank(), s.world_size()), (2, 5));
    assert_eq!(s.replicas(Role::Ps), 2);
    assert_eq!(s.training_world_size(), 3);
    assert_eq!(s.training_rank(), Some(2));
    assert_eq!(s.peer(Role::Ps, 1), Some("j-ps-1.ns.svc:2222"));
    assert_eq!(s.rendezvous(), Some("j-chief-0.ns.svc:2222"));
}

#[test]
fn tf_config_ps_master_alias_and_no_chief() {
    let ps = TFJOB.replace(r#""type":"worker","index":1"#, r#""type":"ps","index":0"#);
    let s = resolve(&[("TF_CONFIG", &ps)]).unwrap();
    assert_eq!((s.role(), s.index(), s.rank()), (Role::Ps, 0, 3));
    assert_eq!(s.training_rank(), None);

    let master = r#"{"cluster":{"master":["m-0:2222"],"worker":["w-0:2222"]},"task":{"type":"master","index":0}}"#;
    let s = resolve(&[("TF_CONFIG", master)]).unwrap();
    assert_eq!((s.role(), s.rank(), s.world_size()), (Role::Chief, 0, 2));

    let no_chief = r#"{"cluster":{"worker":["w-0:2222","w-1:2222"],"ps":["p-0:2222"]},"task":{"type":"worker","index":0}}"#;
    let s = resolve(&[("TF_CONFIG", no_chief)]).unwrap();
    assert_eq!(s.rendezvous(), Some("w-0:2222"));
    assert_eq!((s.rank(), s.world_size()), (0, 3));
}

#[test]
fn tf_config_sparse_and_evaluator() {
    let sparse = r#"{"cluster":{"chief":["c:2222"],"ps":["p0:2222"],"worker":{"3":"w3.ns.svc:2222"}},"task":{"type":"worker","index":3}}"#;
    let s = resolve(&[("TF_CONFIG", sparse)]).unwrap();
    assert_eq!((s.role(), s.index()), (Role::Worker, 3));
    assert_eq!(s.replicas(Role::Worker), 4);
    assert_eq!(s.peer(Role::Worker, 3), Some("w3.ns.svc:2222"));
    assert_eq!(s.peer(Role::Worker, 0), None);

    let eval = r#"{"cluster":{"chief":["c:2222"],"worker":["w:2222"]},"task":{"type":"evaluator","index":0}}"#;
    let s = resolve(&[("TF_CONFIG", eval)]).unwrap();
    assert_eq!(
        (s.role(), s.rank(), s.world_size()),
        (Role::Evaluator, 0, 1)
    );
}

#[test]
fn tf_config_malformed() {
    let cases: &[(&str, &str)] = &[
        ("{not json", "not valid JSON"),
        (r#"{"task":{"type":"worker","index":0}}"#, "cluster"),
        (r#"{"cluster":{"worker":["w:1"]}}"#, "task"),
        (
            r#"{"cluster":{"worker":["w:1"]},"task":{"type":"gardener","index":0}}"#,
            "gardener",
        ),
        (
            r#"{"cluster":{"worker":["w:1"]},"task":{"type":"worker","index":2}}"#,
            "out of range",
        ),
        (
            r#"{"cluster":{"worker":["w:1"]},"task":{"type":"worker","index":"1"}}"#,
            "index",
        ),
        (
            r#"{"cluster":{"worker":["w:1"]},"task":{"type":"worker","index":-1}}"#,
            "index",
        ),
        (
            r#"{"cluster":{"worker":["w"]},"task":{"type":"worker","index":0}}"#,
            "port",
        ),
        (
            r#"{"cluster":{"worker":["w:99999"]},"task":{"type":"worker","index":0}}"#,
            "port",
        ),
        (
            r#"{"cluster":{"worker":[7]},"task":{"type":"worker","index":0}}"#,
            "string",
        ),
        (
            r#"{"cluster":{"worker":"w:1"},"task":{"type":"worker","index":0}}"#,
            "list",
        ),
        (
            r#"{"cluster":{"worker":{"x":"w:1"}},"task":{"type":"worker","index":0}}"#,
            "task index",
        ),
        (
            r#"{"cluster":{"chief":["a:1"],"master":["b:1"],"worker":["w:1"]},"task":{"type":"worker","index":0}}"#,
            "both",
        ),
        (
            r#"{"cluster":{"chief":["a:1","b:1"]},"task":{"type":"chief","index":0}}"#,
            "at most one chief",
        ),
        (
            r#"{"cluster":{"worker":{"2":"w:1"}},"task":{"type":"worker","index":1}}"#,
            "no address",
        ),
        (
            r#"{"cluster":{"trainer":["a:1"]},"task":{"type":"worker","index":0}}"#,
            "trainer",
        ),
    ];
    for (json, needle) in cases {
        config_error(&[("TF_CONFIG", json)], "TF_CONFIG", needle);
    }
}

#[test]
fn torchrun_and_pytorchjob() {
    // PyTorchJob: the master replica is rank 0, worker i is rank i + 1.
    let master = [
        ("MASTER_ADDR", "job-master-0"),
        ("MASTER_PORT", "23456"),
        ("WORLD_SIZE", "3"),
        ("RANK", "0"),
    ];
    let s = resolve(&master).unwrap();
    assert_eq!((s.role(), s.index(), s.rank()), (Role::Chief, 0, 0));
    assert!(s.hosts_rendezvous());
    let w1 = [
        ("MASTER_ADDR", "job-master-0"),
        ("MASTER_PORT", "23456"),
        ("WORLD_SIZE", "3"),
        ("RANK", "2"),
    ];
    let s = resolve(&w1).unwrap();
    assert_eq!((s.role(), s.index()), (Role::Worker, 1));
    assert_eq!(s.rendezvous(), Some("job-master-0:23456"));

    let torchrun = [
        ("RANK", "5"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "4"),
        ("GROUP_RANK", "1"),
        ("MASTER_ADDR", "10.0.0.1"),
        ("MASTER_PORT", "29500"),
    ];
    let s = resolve(&torchrun).unwrap();
    assert_eq!(
        (s.local_rank(), s.local_world_size(), s.node_rank()),
        (1, 4, Some(1))
    );

    let pet = [
        ("PET_NNODES", "2"),
        ("PET_NPROC_PER_NODE", "4"),
        ("PET_NODE_RANK", "1"),
        ("LOCAL_RANK", "2"),
        ("PET_MASTER_ADDR", "job-master-0"),
        ("PET_MASTER_PORT", "23456"),
    ];
    let s = resolve(&pet).unwrap();
    assert_eq!((s.rank(), s.world_size(), s.local_world_size()), (6, 8, 4));
    assert_eq!(s.rendezvous(), Some("job-master-0:23456"));
}

#[test]
fn torchrun_malformed() {
    config_error(&[("RANK", "x"), ("WORLD_SIZE", "2")], "RANK", "integer");
    config_error(&[("RANK", "2"), ("WORLD_SIZE", "2")], "RANK", "not below");
    config_error(&[("RANK", "0")], "WORLD_SIZE", "not set");
    config_error(
        &[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")],
        "MASTER_PORT",
        "not set",
    );
    config_error(
        &[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "http"),
        ],
        "MASTER_PORT",
        "port",
    );
    config_error(
        &[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "3"),
            ("LOCAL_WORLD_SIZE", "2"),
        ],
        "RANK",
        "local rank",
    );
    config_error(
        &[("PET_NNODES", "2"), ("PET_NODE_RANK", "2")],
        "PET_NODE_RANK",
        "not below",
    );
}

#[test]
fn slurm_multi_node() {
    let env = [
        ("SLURM_JOB_ID", "4242"),
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "7"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_NODEID", "2"),
        ("SLURM_JOB_NODELIST", "node[01-03,07]"),
        ("SLURM_TASKS_PER_NODE", "2(x3),1"),
    ];
    let s = resolve(&env).unwrap();
    assert_eq!(s.source(), Convention::Slurm);
    assert_eq!(
        (
            s.rank(),
            s.world_size(),
            s.local_rank(),
            s.local_world_size()
        ),
        (5, 7, 1, 2)
    );
    assert_eq!(s.node_rank(), Some(2));
    assert_eq!(s.peer(Role::Chief, 0), Some("node01"));
    assert_eq!(s.peer(Role::Worker, 3), Some("node03")); // rank 4
    assert_eq!(s.peer(Role::Worker, 5), Some("node07")); // rank 6
    assert_eq!(
        s.rendezvous(),
        Some(format!("node01:{}", slurm_default_port(Some(4242))).as_str())
    );

    let mut with_port = env.to_vec();
    with_port.push(("TANDEM_RENDEZVOUS_PORT", "31000"));
    assert_eq!(
        resolve(&with_port).unwrap().rendezvous(),
        Some("node01:31000")
    );
}

#[test]
fn slurm_malformed() {
    let base = [
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "4"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_NODEID", "0"),
        ("SLURM_JOB_NODELIST", "n[1-2]"),
        ("SLURM_TASKS_PER_NODE", "2(x2)"),
    ];
    assert!(resolve(&base).is_ok());
    let with = |k: &'static str, v: &'static str| {
        let mut e: Vec<(&str, &str)> = base.iter().filter(|(n, _)| *n != k).copied().collect();
        e.push((k, v));
        e
    };
    config_error(
        &with("SLURM_JOB_NODELIST", "n[1-"),
        "SLURM_JOB_NODELIST",
        "unclosed",
    );
    config_error(
        &with("SLURM_TASKS_PER_NODE", "2(x3)"),
        "SLURM_TASKS_PER_NODE",
        "SLURM_NTASKS",
    );
    config_error(
        &with("SLURM_TASKS_PER_NODE", "0,4"),
        "SLURM_TASKS_PER_NODE",
        "no tasks",
    );
    config_error(
        &with("SLURM_JOB_NODELIST", "n[1-3]"),
        "SLURM_TASKS_PER_NODE",
        "nodes",
    );
    config_error(&with("SLURM_NODEID", "5"), "SLURM_NODEID", "beyond");
    config_error(&with("SLURM_LOCALID", "2"), "SLURM_LOCALID", "not below");
    config_error(&with("SLURM_PROCID", "four"), "SLURM_PROCID", "integer");
    config_error(&with("SLURM_PROCID", "4"), "SLURM_PROCID", "not below");
    config_error(&[("SLURM_PROCID", "0")], "SLURM_NTASKS", "not set");
}

#[test]
fn open_mpi_and_pmi() {
    let ompi = [
        ("OMPI_COMM_WORLD_RANK", "3"),
        ("OMPI_COMM_WORLD_SIZE", "4"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ("MASTER_ADDR", "head"),
        ("MASTER_PORT", "29500"),
    ];
    let s = resolve(&ompi).unwrap();
    assert_eq!(s.source(), Convention::OpenMpi);
    assert_eq!(
        (
            s.rank(),
            s.world_size(),
            s.local_rank(),
            s.local_world_size()
        ),
        (3, 4, 1, 2)
    );
    assert_eq!(s.rendezvous(), Some("head:29500"));

    let pmi = [
        ("PMI_RANK", "1"),
        ("PMI_SIZE", "2"),
        ("MPI_LOCALRANKID", "1"),
        ("MPI_LOCALNRANKS", "2"),
    ];
    let s = resolve(&pmi).unwrap();
    assert_eq!(
        (s.source(), s.rank(), s.local_rank()),
        (Convention::Pmi, 1, 1)
    );
    let e = s.require_rendezvous().unwrap_err().to_string();
    assert!(e.contains("TANDEM_RENDEZVOUS_ADDR"), "{e}");

    config_error(
        &[
            ("OMPI_COMM_WORLD_RANK", "-1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
        ],
        "OMPI_COMM_WORLD_RANK",
        "integer",
    );
    config_error(&[("PMI_RANK", "0")], "PMI_SIZE", "not set");
    config_error(
        &[("PMI_RANK", "9"), ("PMI_SIZE", "2")],
        "PMI_RANK",
        "not below",
    );
}

#[test]
fn tandem_vars_and_overrides() {
    let env = [
        ("TANDEM_RANK", "1"),
        ("TANDEM_WORLD_SIZE", "3"),
        ("TANDEM_ROLE", "ps"),
        ("TANDEM_ROLE_INDEX", "0"),
        ("TANDEM_RENDEZVOUS_ADDR", "127.0.0.1:4000"),
    ];
    let s = resolve(&env).unwrap();
    assert_eq!(
        (s.source(), s.role(), s.index(), s.rank()),
        (Convention::Tandem, Role::Ps, 0, 1)
    );
    assert_eq!(s.rendezvous(), Some("127.0.0.1:4000"));
    config_error(
        &[
            ("TANDEM_RANK", "0"),
            ("TANDEM_WORLD_SIZE", "1"),
            ("TANDEM_ROLE", "boss"),
        ],
        "TANDEM_ROLE",
        "boss",
    );
    config_error(
        &[("TANDEM_RENDEZVOUS_ADDR", "nowhere")],
        "TANDEM_RENDEZVOUS_ADDR",
        "port",
    );
    config_error(
        &[("TANDEM_LAUNCHER", "kubelet")],
        "TANDEM_LAUNCHER",
        "kubelet",
    );
    config_error(
        &[("TANDEM_LAUNCHER", "slurm")],
        "TANDEM_LAUNCHER",
        "none of its variables",
    );
}

#[test]
fn disagreeing_launchers_are_an_error_unless_chosen() {
    let env = [
        ("RANK", "1"),
        ("WORLD_SIZE", "4"),
        ("OMPI_COMM_WORLD_RANK", "2"),
        ("OMPI_COMM_WORLD_SIZE", "4"),
    ];
    config_error(&env, "TANDEM_LAUNCHER", "disagree");
    let mut chosen = env.to_vec();
    chosen.push(("TANDEM_LAUNCHER", "openmpi"));
    assert_eq!(resolve(&chosen).unwrap().rank(), 2);

    // Agreeing launchers are fine.
    let agree = [
        ("RANK", "2"),
        ("WORLD_SIZE", "4"),
        ("OMPI_COMM_WORLD_RANK", "2"),
        ("OMPI_COMM_WORLD_SIZE", "4"),
    ];
    assert_eq!(resolve(&agree).unwrap().source(), Convention::Torchrun);

    // torchrun inside one Slurm task of a batch script: Slurm is the outer allocation.
    let nested = [
        ("RANK", "3"),
        ("WORLD_SIZE", "4"),
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "1"),
    ];
    assert_eq!(resolve(&nested).unwrap().rank(), 3);
}
