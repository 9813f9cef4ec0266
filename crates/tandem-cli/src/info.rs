//! `tandem info` and `tandem rendezvous`.
//!
//! Why `info` first: when a job does not start, the question is nearly always what the process
//! read from its environment; `tandem info` resolves it exactly as a group would (the launcher
//! convention found, rank, world size, role, rendezvous) or prints the configuration error naming
//! the variable. `tandem rendezvous` runs a standalone rendezvous for launchers that host it
//! outside rank 0 (`TANDEM_RENDEZVOUS_EXTERNAL=1`).
//!
//! What it prints for rank 1 of a job of 4 started with Tandem's own variables
//! (`TANDEM_RANK=1 TANDEM_WORLD_SIZE=4 TANDEM_RENDEZVOUS_ADDR=10.0.0.1:29500`):
//!
//! ```text
//! source:           tandem
//! role:             worker 0
//! rank:             1 of 4
//! local rank:       0 of 1
//! replicas:         chief=1 worker=3
//! rendezvous:       10.0.0.1:29500
//! ```
//!
//! and for `TANDEM_RANK=5 TANDEM_WORLD_SIZE=4`, the error every process of that job would stop with:
//!
//! ```text
//! tandem: configuration error in TANDEM_RANK: rank 5 is not below the world size 4
//! ```
//!
//! `--json` prints the spec as JSON (what `tandem._native.cluster_spec` returns to Python).

use crate::ExitCode;

use clap::Args;
use tandem::cluster::ClusterSpec;
use tandem::rendezvous::{Host, JobToken, ServerConfig, TOKEN_VAR};
use tandem::{Error, Result};

/// Arguments of `tandem info`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Prints what Tandem sees in this environment; exits 2 on a configuration error.
pub fn info(args: InfoArgs) -> Result<ExitCode> {
    match ClusterSpec::from_env() {
        Ok(spec) => {
            if args.json {
                let text = serde_json::to_string_pretty(&spec)
                    .map_err(|e| Error::transport("encoding the spec as JSON", e.to_string()))?;
                println!("{text}");
            } else {
                print!("{spec}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if args.json {
                let v =
                    serde_json::json!({ "error": { "kind": e.kind(), "message": e.to_string() } });
                println!("{v}");
            } else {
                eprintln!("tandem: {e}");
            }
            Ok(ExitCode::from(2))
        }
    }
}

/// Arguments of `tandem rendezvous`.
#[derive(Args, Debug)]
pub struct RendezvousArgs {
    /// Address to listen on (host:port); loopback unless told otherwise.
    #[arg(long, default_value = "127.0.0.1:29500")]
    bind: String,
}

/// Serves a rendezvous until Ctrl-C or SIGTERM.
pub fn rendezvous(args: RendezvousArgs) -> Result<ExitCode> {
    let token = JobToken::from_env()?.ok_or_else(|| {
        Error::config(
            TOKEN_VAR,
            "is not set; the rendezvous refuses to run without a job token",
        )
    })?;
    crate::runtime()?.block_on(async {
        let host = Host::bind(&args.bind, ServerConfig::new(token)).await?;
        println!("rendezvous listening on {}", host.addr());
        host.serve_until_signal().await
    })?;
    Ok(ExitCode::SUCCESS)
}
