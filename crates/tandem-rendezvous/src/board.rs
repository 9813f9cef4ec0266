//! Boards: where rank 0 publishes the address of the rendezvous it hosts when another program owns
//! the agreed port (torchrun's agent store on `MASTER_PORT`, or the Store torch hands a
//! `torch.distributed` backend), so the other ranks find it without a second port or variable.
//!
//! On one machine the record also carries a fresh job token, so a single-machine torchrun job
//! needs no `TANDEM_JOB_TOKEN`: anyone able to read the board could already reach every port of
//! the job on loopback. Across machines the board is plaintext, so the token never travels on it.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_core::cluster::{ClusterSpec, Convention};
use tandem_core::{Error, Result};

use crate::torch_store::TorchStore;

/// What rank 0 publishes on a board.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// The rendezvous's `host:port`.
    pub addr: String,
    /// The job token, when every rank runs on rank 0's machine and none was configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl Published {
    /// The record as bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a record read from `board`, checking its address.
    pub fn decode(bytes: &[u8], board: &str) -> Result<Published> {
        let p: Published = serde_json::from_slice(bytes).map_err(|e| {
            Error::transport(
                board.to_string(),
                format!("holds a rendezvous record Tandem cannot read ({e})"),
            )
        })?;
        tandem_core::cluster::check_address(board, &p.addr)?;
        Ok(p)
    }
}

/// A place rank 0 publishes its rendezvous record and the other ranks read it from.
pub trait Board: Send + Sync + std::fmt::Debug {
    /// Where, for messages ("torch's store at host:port").
    fn describe(&self) -> String;
    /// Publishes rank 0's record.
    fn publish(&self, record: &Published, deadline: Duration) -> Result<()>;
    /// Waits up to `deadline` for rank 0's record.
    fn lookup(&self, deadline: Duration) -> Result<Published>;
}

/// How a group joins through a board.
#[derive(Clone, Debug)]
pub struct BoardPlan {
    /// Where rank 0's record goes.
    pub board: std::sync::Arc<dyn Board>,
    /// Whether every rank runs on rank 0's machine (the rendezvous then binds loopback, and a
    /// token is made when none is configured).
    pub one_machine: bool,
    /// An address rank 0 routes towards to choose its interface when the job spans machines.
    pub towards: Option<String>,
}

/// The store torchrun's agent hosts for the whole job on `MASTER_ADDR:MASTER_PORT`.
#[derive(Debug, Clone)]
pub struct TorchrunStore {
    /// The store's address.
    store: String,
    /// The key the record is published under.
    key: String,
}

impl TorchrunStore {
    /// The agent's store for a job `spec` describes, when torchrun started this process and its
    /// agent hosts the store (`TORCHELASTIC_USE_AGENT_STORE=True`) and nothing names another
    /// rendezvous (`TANDEM_RENDEZVOUS_ADDR`). `group` names the process group, so several groups
    /// of one job publish apart; the run id and restart count keep restarts apart.
    pub fn from_spec(
        spec: &ClusterSpec,
        group: &str,
        var: impl Fn(&str) -> Option<String>,
    ) -> Option<TorchrunStore> {
        let agent = var("TORCHELASTIC_USE_AGENT_STORE")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        if spec.source() != Convention::Torchrun
            || !agent
            || var(tandem_core::settings::RENDEZVOUS_ADDR.name)
                .is_some_and(|v| !v.trim().is_empty())
        {
            return None;
        }
        let store = spec.rendezvous()?.to_string();
        let run = var("TORCHELASTIC_RUN_ID").unwrap_or_else(|| "none".into());
        let restart = var("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|| "0".into());
        Some(TorchrunStore {
            store,
            key: format!("tandem/{run}/{restart}/{group}/rendezvous"),
        })
    }

    /// The key the record is published under.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Board for TorchrunStore {
    fn describe(&self) -> String {
        format!("torch's store at {}", self.store)
    }

    fn publish(&self, record: &Published, deadline: Duration) -> Result<()> {
        TorchStore::connect(&self.store, deadline)?.set(&self.key, &record.encode(), deadline)
    }

    fn lookup(&self, deadline: Duration) -> Result<Published> {
        let bytes = TorchStore::connect(&self.store, deadline)?
            .get(&self.key, deadline)
            .map_err(|e| match e {
                Error::Timeout { .. } => Error::timeout(
                    format!(
                        "rank 0 to publish the rendezvous in {} (key {})",
                        self.describe(),
                        self.key
                    ),
                    deadline,
                ),
                other => other,
            })?;
        Published::decode(&bytes, &self.describe())
    }
}

/// Where rank 0 binds a rendezvous it publishes on a board: `bind` when given; loopback when every
/// rank runs on this machine; else the address of the interface that routes to `towards` (the
/// board's host).
pub fn board_bind(bind: Option<&str>, one_machine: bool, towards: Option<&str>) -> Result<String> {
    if let Some(b) = bind {
        return Ok(b.to_string());
    }
    if one_machine {
        return Ok("127.0.0.1:0".into());
    }
    let ip = towards
        .and_then(tandem_core::cluster::local_address_towards)
        .ok_or_else(|| {
            Error::config(
                crate::session::BIND_VAR,
                "is not set, and no interface routes to the master's address; set it to this machine's address and port 0 (e.g. 10.0.0.5:0)",
            )
        })?;
    Ok(match ip {
        std::net::IpAddr::V6(v6) => format!("[{v6}]:0"),
        v4 => format!("{v4}:0"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    const TORCHRUN: [(&str, &str); 8] = [
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
        ("TORCHELASTIC_RUN_ID", "job7"),
        ("TORCHELASTIC_RESTART_COUNT", "2"),
    ];

    #[test]
    fn torchrun_with_an_agent_store_publishes_there_under_a_key_per_run_restart_and_group() {
        let mut vars = TORCHRUN.to_vec();
        vars.push(("TORCHELASTIC_USE_AGENT_STORE", "True"));
        let spec = ClusterSpec::from_vars(vars.as_slice()).expect("spec");
        let board = TorchrunStore::from_spec(&spec, "default", lookup(&vars)).expect("a board");
        assert_eq!(board.key(), "tandem/job7/2/default/rendezvous");
        assert_eq!(board.describe(), "torch's store at 127.0.0.1:29500");
    }

    #[test]
    fn without_the_agent_store_or_with_an_explicit_rendezvous_there_is_no_board() {
        let spec = ClusterSpec::from_vars(&TORCHRUN).expect("spec");
        assert!(TorchrunStore::from_spec(&spec, "g", lookup(&TORCHRUN)).is_none());
        let mut vars = TORCHRUN.to_vec();
        vars.push(("TORCHELASTIC_USE_AGENT_STORE", "False"));
        assert!(TorchrunStore::from_spec(&spec, "g", lookup(&vars)).is_none());
        vars.pop();
        vars.push(("TORCHELASTIC_USE_AGENT_STORE", "True"));
        vars.push(("TANDEM_RENDEZVOUS_ADDR", "10.0.0.1:5000"));
        let spec = ClusterSpec::from_vars(vars.as_slice()).expect("spec");
        assert!(TorchrunStore::from_spec(&spec, "g", lookup(&vars)).is_none());
        // A job that is not torchrun's (Slurm) never uses it.
        let slurm = [
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ];
        let spec = ClusterSpec::from_vars(&slurm).expect("spec");
        assert!(TorchrunStore::from_spec(&spec, "g", lookup(&slurm)).is_none());
    }

    #[test]
    fn torchrun_store_publishes_the_record_under_its_key() {
        let (addr, server) = crate::torch_store::tests::recording_store();
        let board = TorchrunStore {
            store: addr,
            key: "tandem/run/0/g/rendezvous".into(),
        };
        let record = Published {
            addr: "127.0.0.1:4242".into(),
            token: None,
        };
        board
            .publish(&record, Duration::from_secs(5))
            .expect("publish");
        let want =
            crate::torch_store::tests::set_request(b"tandem/run/0/g/rendezvous", &record.encode());
        assert_eq!(server.join().expect("server"), want);
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_named() {
        let p = Published {
            addr: "127.0.0.1:4242".into(),
            token: Some("t".into()),
        };
        assert_eq!(Published::decode(&p.encode(), "b").expect("decode"), p);
        let no_token = Published {
            addr: "10.0.0.1:1".into(),
            token: None,
        };
        assert!(!String::from_utf8_lossy(&no_token.encode()).contains("token"));
        let e = Published::decode(b"not json", "the board").unwrap_err();
        assert!(e.to_string().contains("the board"), "{e}");
        let e = Published::decode(br#"{"addr":"nowhere"}"#, "the board").unwrap_err();
        assert!(e.to_string().contains("nowhere"), "{e}");
    }

    #[test]
    fn the_bind_address_is_the_given_one_then_loopback_on_one_machine_then_the_route() {
        assert_eq!(
            board_bind(Some("0.0.0.0:7"), true, None).expect("b"),
            "0.0.0.0:7"
        );
        assert_eq!(board_bind(None, true, None).expect("b"), "127.0.0.1:0");
        assert_eq!(
            board_bind(None, false, Some("127.0.0.1:9")).expect("b"),
            "127.0.0.1:0"
        );
        let e = board_bind(None, false, None).unwrap_err();
        assert!(e.to_string().contains(crate::session::BIND_VAR), "{e}");
    }
}
