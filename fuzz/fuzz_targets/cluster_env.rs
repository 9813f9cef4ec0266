//! What a process reads to find its job: TF_CONFIG, torchrun's, Slurm's and Open MPI's variables,
//! and Slurm's compressed host lists, fed any text. Errors are fine; panics are not.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use tandem_core::cluster::{ClusterSpec, expand_hostlist, expand_tasks_per_node};

/// Variables each convention reads; the input's lines fill them in turn.
const NAMES: [&str; 16] = [
    "TF_CONFIG",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_JOB_NODELIST",
    "SLURM_TASKS_PER_NODE",
    "SLURM_LOCALID",
    "SLURM_JOB_ID",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "TANDEM_RENDEZVOUS_ADDR",
    "TANDEM_LAUNCHER",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = expand_hostlist("SLURM_JOB_NODELIST", text);
    let _ = expand_tasks_per_node("SLURM_TASKS_PER_NODE", text);
    // The whole input as TF_CONFIG alone, then its lines as the variables of every convention.
    let alone: HashMap<String, String> = HashMap::from([("TF_CONFIG".into(), text.into())]);
    let _ = ClusterSpec::from_vars(&alone);
    let vars: HashMap<String, String> = NAMES
        .iter()
        .zip(text.split('\n'))
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if let Ok(spec) = ClusterSpec::from_vars(&vars) {
        assert!(spec.rank() < spec.world_size().max(1));
    }
});
