//! `tandem demo`: the README's main job. Starts a rendezvous and N processes on this machine that find
//! each other through it, exchange values, pass barriers and check a shared counter.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tandem::rendezvous::Session;
use tandem::{Error, Result};

use crate::launch::LocalJob;

/// Arguments of `tandem demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Number of processes.
    #[arg(long, default_value_t = 4)]
    nproc: usize,
    /// Seconds the whole job may take before it is stopped.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

/// Arguments of one demo rank.
#[derive(Args, Debug)]
pub struct RankArgs {
    /// Seconds to wait for peers.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

/// Runs the demo job: a rendezvous in this process and `nproc` child processes.
pub fn demo(args: DemoArgs) -> Result<ExitCode> {
    if args.nproc == 0 || args.nproc > 64 {
        return Err(Error::invalid(
            "--nproc",
            format!("{} is not between 1 and 64", args.nproc),
        ));
    }
    println!(
        "tandem demo: {} processes meeting through a rendezvous on this machine",
        args.nproc
    );
    let job = LocalJob::start(args.nproc, &["demo-rank".to_string()], &[], |rank, line| {
        println!("[rank {rank}] {line}")
    })?;
    let failed = job.wait(Duration::from_secs(args.timeout))?;
    if failed.is_empty() {
        println!("tandem demo: all {} processes met and agreed", args.nproc);
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("tandem demo: failed ranks: {}", failed.join(", "));
        Ok(ExitCode::from(1))
    }
}

/// One rank: join, publish, read everyone, count together, leave.
pub fn rank(args: RankArgs) -> Result<ExitCode> {
    let deadline = Duration::from_secs(args.timeout);
    crate::runtime()?.block_on(async move {
        let session = Session::join_from_env(deadline).await?;
        let spec = session.spec().clone();
        let (rank, n) = (spec.rank(), spec.world_size());
        let c = &session.client;
        c.set(
            &format!("demo/member/{rank}"),
            format!(
                "{} {} pid {}",
                spec.role(),
                spec.index(),
                std::process::id()
            ),
        )
        .await?;
        let keys: Vec<String> = (0..n).map(|r| format!("demo/member/{r}")).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let members = c.wait(&keys, deadline).await?;
        c.add("demo/sum", rank as i64 + 1).await?;
        c.barrier("demo/counted", n, rank, deadline).await?;
        let sum = c.get("demo/sum").await?.unwrap_or_default();
        let sum: i64 = String::from_utf8_lossy(&sum).parse().unwrap_or(-1);
        let expected = (n * (n + 1) / 2) as i64;
        if rank == 0 {
            for (r, m) in members.iter().enumerate() {
                println!("member {r}: {}", String::from_utf8_lossy(m));
            }
        }
        println!(
            "rank {rank} of {n}: met {} peers; shared counter {sum} (expected {expected})",
            members.len()
        );
        session.leave(deadline).await?;
        if sum != expected {
            return Err(Error::transport(
                "checking the shared counter",
                format!("got {sum}, expected {expected}"),
            ));
        }
        Ok(ExitCode::SUCCESS)
    })
}
