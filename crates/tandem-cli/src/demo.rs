//! `tandem demo`: the README's main job. Starts a rendezvous and N processes on this machine that find
//! each other through it, exchange values, pass barriers and check a shared counter.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use tandem::rendezvous::{EXTERNAL_VAR, Host, JobToken, ServerConfig, Session, TOKEN_VAR};
use tandem::{Error, Result};

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
    let rt = crate::runtime()?;
    let token = JobToken::generate();
    let host = rt.block_on(Host::bind("127.0.0.1:0", ServerConfig::new(token.clone())))?;
    println!(
        "tandem demo: rendezvous on {} with {} processes",
        host.addr(),
        args.nproc
    );
    let exe = std::env::current_exe().map_err(|e| Error::io("finding the tandem executable", e))?;
    let mut children = Vec::new();
    for rank in 0..args.nproc {
        let mut child = Command::new(&exe)
            .arg("demo-rank")
            .env("TANDEM_LAUNCHER", "tandem")
            .env("TANDEM_RANK", rank.to_string())
            .env("TANDEM_WORLD_SIZE", args.nproc.to_string())
            .env("TANDEM_LOCAL_RANK", rank.to_string())
            .env("TANDEM_LOCAL_WORLD_SIZE", args.nproc.to_string())
            .env("TANDEM_RENDEZVOUS_ADDR", host.addr().to_string())
            .env(EXTERNAL_VAR, "1")
            .env(TOKEN_VAR, token.as_str())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io(format!("starting rank {rank}"), e))?;
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
                    println!("[rank {rank}] {line}");
                }
            });
        }
        children.push(child);
    }
    let failed = wait_all(&mut children, Duration::from_secs(args.timeout));
    rt.block_on(host.stop())?;
    if failed.is_empty() {
        println!("tandem demo: all {} processes met and agreed", args.nproc);
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("tandem demo: failed ranks: {}", failed.join(", "));
        Ok(ExitCode::from(1))
    }
}

/// Waits for every child, killing all of them when the deadline passes; returns what failed.
fn wait_all(children: &mut [Child], timeout: Duration) -> Vec<String> {
    let end = Instant::now() + timeout;
    let mut status: Vec<Option<String>> = vec![None; children.len()];
    while status.iter().any(Option::is_none) {
        for (rank, child) in children.iter_mut().enumerate() {
            if status[rank].is_none()
                && let Ok(Some(s)) = child.try_wait()
            {
                status[rank] = Some(if s.success() {
                    String::new()
                } else {
                    format!("rank {rank} ({s})")
                });
            }
        }
        if Instant::now() >= end {
            for (rank, child) in children.iter_mut().enumerate() {
                if status[rank].is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                    status[rank] = Some(format!("rank {rank} (killed after {timeout:?})"));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    status
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .collect()
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
