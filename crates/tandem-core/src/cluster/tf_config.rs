//! `TF_CONFIG`, the JSON Kubeflow's TFJob (and TensorFlow's distribution strategies) inject.
//!
//! ```json
//! {"cluster": {"chief": ["j-chief-0.ns.svc:2222"],
//!              "ps": ["j-ps-0.ns.svc:2222", "j-ps-1.ns.svc:2222"],
//!              "worker": ["j-worker-0.ns.svc:2222", "j-worker-1.ns.svc:2222"]},
//!  "task": {"type": "worker", "index": 1},
//!  "environment": "cloud"}
//! ```
//! `master` is accepted as an alias of `chief`; a role may also be the sparse map `{"1": "host:port"}`
//! that dynamically added workers receive.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::error::{Error, Result};

use super::spec::{ClusterSpec, Convention, Role};
use crate::vars::{Vars, check_address};

const VAR: &str = "TF_CONFIG";

fn err(problem: impl Into<String>) -> Error {
    Error::config(VAR, problem)
}

fn parse_members(role: &str, value: &Value) -> Result<BTreeMap<usize, String>> {
    let check = |index: usize, v: &Value| -> Result<(usize, String)> {
        let addr = v.as_str().ok_or_else(|| {
            err(format!(
                "cluster.{role}[{index}] must be a \"host:port\" string, got {v}"
            ))
        })?;
        check_address(VAR, addr).map_err(|e| match e {
            Error::Config { problem, .. } => err(format!("cluster.{role}[{index}]: {problem}")),
            other => other,
        })?;
        Ok((index, addr.to_string()))
    };
    match value {
        Value::Array(items) => items.iter().enumerate().map(|(i, v)| check(i, v)).collect(),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                let i = k
                    .parse::<usize>()
                    .map_err(|_| err(format!("cluster.{role} key {k:?} is not a task index")))?;
                check(i, v)
            })
            .collect(),
        other => Err(err(format!(
            "cluster.{role} must be a list of addresses or a map from index to address, got {other}"
        ))),
    }
}

/// Reads `TF_CONFIG`, if set.
pub(crate) fn tf_config(vars: &(impl Vars + ?Sized)) -> Result<Option<ClusterSpec>> {
    let Some(text) = vars.var(VAR) else {
        return Ok(None);
    };
    let json: Value =
        serde_json::from_str(&text).map_err(|e| err(format!("is not valid JSON: {e}")))?;
    let cluster = json
        .get("cluster")
        .and_then(Value::as_object)
        .ok_or_else(|| err("has no \"cluster\" object"))?;
    let (peers, replicas) = parse_cluster(cluster)?;
    let (role, type_name, index) = parse_task(&json)?;
    let in_cluster = replicas.get(&role).copied().unwrap_or(0);
    let (rank, world_size) = rank_of(role, &type_name, index, &peers, &replicas)?;
    // The chief (or worker 0 when there is none) hosts the rendezvous at its own address.
    let rendezvous = peers
        .get(&Role::Chief)
        .and_then(|m| m.get(&0))
        .or_else(|| peers.get(&Role::Worker).and_then(|m| m.get(&0)))
        .cloned();
    let local_rank = crate::settings::LOCAL_RANK.count(vars)?.unwrap_or(0);
    let local_world_size = crate::settings::LOCAL_WORLD_SIZE
        .count(vars)?
        .unwrap_or(local_rank + 1);
    let mut spec = ClusterSpec {
        source: Convention::TfConfig,
        role,
        index,
        rank,
        world_size,
        local_rank,
        local_world_size,
        node_rank: None,
        replicas,
        peers,
        rendezvous,
    };
    if role == Role::Evaluator && in_cluster == 0 {
        spec.replicas.insert(Role::Evaluator, 1);
    }
    spec.validate(VAR).map(Some)
}

type Peers = BTreeMap<Role, BTreeMap<usize, String>>;

/// The task's rank and the world size: every task counts, in the order chief, workers, parameter
/// servers, evaluators; an evaluator outside the cluster is a job of its own (as TensorFlow runs it).
fn rank_of(
    role: Role,
    type_name: &str,
    index: usize,
    peers: &Peers,
    replicas: &BTreeMap<Role, usize>,
) -> Result<(usize, usize)> {
    let in_cluster = replicas.get(&role).copied().unwrap_or(0);
    if role == Role::Evaluator && in_cluster == 0 {
        return Ok((0, 1));
    }
    if index >= in_cluster {
        return Err(err(format!(
            "task.index {index} is out of range: the cluster lists {in_cluster} {type_name} task(s)"
        )));
    }
    if let Some(members) = peers.get(&role)
        && !members.contains_key(&index)
    {
        return Err(err(format!(
            "cluster.{type_name} has no address for task index {index}"
        )));
    }
    let before: usize = Role::ALL
        .iter()
        .take_while(|r| **r != role)
        .map(|r| replicas.get(r).copied().unwrap_or(0))
        .sum();
    Ok((before + index, replicas.values().sum()))
}

/// `cluster`: each task type's members (by index) and how many of each there are.
fn parse_cluster(
    cluster: &serde_json::Map<String, Value>,
) -> Result<(Peers, BTreeMap<Role, usize>)> {
    let mut peers: Peers = BTreeMap::new();
    let mut replicas: BTreeMap<Role, usize> = BTreeMap::new();
    for (name, members) in cluster {
        let role: Role = name
            .parse()
            .map_err(|_| err(format!("cluster has unknown task type {name:?}; expected chief, master, worker, ps or evaluator")))?;
        if peers.contains_key(&role) {
            return Err(err(
                "cluster lists both \"chief\" and \"master\"; they are the same role",
            ));
        }
        let members = parse_members(name, members)?;
        // A sparse map lists some indices only; the group is at least as large as its highest index.
        let count = members.keys().next_back().map_or(0, |i| i + 1);
        if role == Role::Chief && count > 1 {
            return Err(err(format!(
                "cluster.{name} lists {count} tasks; a job has at most one chief"
            )));
        }
        replicas.insert(role, count);
        peers.insert(role, members);
    }
    Ok((peers, replicas))
}

/// `task`: which task this process is (role, the type's name as written, index).
fn parse_task(json: &Value) -> Result<(Role, String, usize)> {
    let task = json
        .get("task")
        .and_then(Value::as_object)
        .ok_or_else(|| err("has no \"task\" object saying which task this process is"))?;
    let type_name = task
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| err("task.type is missing or not a string"))?;
    let role: Role = type_name.parse().map_err(|_| {
        err(format!(
            "task.type {type_name:?} is unknown; expected chief, master, worker, ps or evaluator"
        ))
    })?;
    let index = match task.get("index") {
        None => 0,
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| err(format!("task.index {n} is not a non-negative integer")))?,
        Some(other) => {
            return Err(err(format!(
                "task.index must be a non-negative integer, got {other}"
            )));
        }
    };
    Ok((role, type_name.to_string(), index))
}
