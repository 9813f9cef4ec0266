//! Helper binary for the multi-process tests: one rank of a job, driven by its environment.
//!
//! `tandem-test-node meet [--host] [--timeout SECS]` joins the job, publishes a value derived from its
//! rank and pid, waits for everyone's, adds to a shared counter, passes a barrier and prints
//! `RESULT {json}`. With `--host` this rank hosts the rendezvous on an ephemeral port and prints
//! `ADDR host:port` first. Errors print `ERROR kind message` and exit with status 3.

use std::time::Duration;

use tandem::cluster::ClusterSpec;
use tandem::rendezvous::{Host, JobToken, ServerConfig, Session};
use tandem::{Error, Result};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            println!("ERROR io {e}");
            std::process::exit(3);
        }
    };
    let r = match args.first().map(String::as_str) {
        Some("meet") => rt.block_on(meet(&args[1..])),
        other => Err(Error::invalid("mode", format!("unknown mode {other:?}"))),
    };
    if let Err(e) = r {
        println!("ERROR {} {e}", e.kind());
        eprintln!("{e}");
        std::process::exit(3);
    }
}

fn flag_value(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

async fn meet(args: &[String]) -> Result<()> {
    let secs: u64 = flag_value(args, "--timeout")
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let deadline = Duration::from_secs(secs);
    let spec = ClusterSpec::from_env()?;
    let token =
        JobToken::from_env()?.ok_or_else(|| Error::config("TANDEM_JOB_TOKEN", "not set"))?;
    let mut host = None;
    let session = if args.iter().any(|a| a == "--host") {
        let h = Host::bind("127.0.0.1:0", ServerConfig::new(token.clone())).await?;
        println!("ADDR {}", h.addr());
        let spec = ClusterSpec::builder()
            .rank(spec.rank())
            .world_size(spec.world_size())
            .rendezvous(h.addr().to_string())
            .build()?;
        host = Some(h);
        Session::join(&spec, &token, None, true, deadline).await?
    } else {
        Session::join(&spec, &token, None, true, deadline).await?
    };
    let (rank, n) = (spec.rank(), spec.world_size());
    let c = &session.client;
    let mine = format!("rank{rank}-pid{}", std::process::id());
    c.set(&format!("value/{rank}"), mine.clone()).await?;
    let keys: Vec<String> = (0..n).map(|r| format!("value/{r}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let values = c.wait(&keys, deadline).await?;
    let values: Vec<String> = values
        .iter()
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    c.add("counter", rank as i64 + 1).await?;
    c.barrier("counted", n, rank, deadline).await?;
    let counter = c
        .get("counter")
        .await?
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    let result =
        serde_json::json!({ "rank": rank, "mine": mine, "values": values, "counter": counter });
    println!("RESULT {result}");
    session.leave(deadline).await?;
    if let Some(h) = host {
        h.stop().await?;
    }
    Ok(())
}
