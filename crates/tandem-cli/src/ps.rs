//! `tandem ps`: a parameter server for this process's role (TF_CONFIG, `TANDEM_*` or flags).
//!
//! Why a subcommand and not only a library call: a TFJob's `PS` replicas run whatever command the
//! manifest gives their container; `tandem ps` lets that container run Tandem's image with no user
//! code at all. Where it serves comes from the job's environment (its own address in TF_CONFIG's
//! `ps` list) or `--bind`; `--replicate` (or `--follow ADDR`) makes it a standby of the previous
//! server; `--checkpoint-dir` restores from and writes checkpoints; `--worker-timeout` and
//! `--worker-lease` bound how long silent workers are waited for. It prints a summary line naming
//! the slowest worker every `--log-every` seconds, serves metrics with `--metrics-addr`, and exits
//! once every worker said done unless `--keep-running`.
//!
//! Checkpoints: `--checkpoint-every N` writes one every N versions (and a last one when silent
//! workers stop the server); a server restarted with the same folder resumes from its file, and
//! workers waiting on it notice the restart by the server's new incarnation.

use crate::ExitCode;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tandem::cluster::{ClusterSpec, Role};
use tandem::ps::server::{CheckpointPolicy, FollowConfig, Server, ServerConfig, summary};
use tandem::rendezvous::{JobToken, TOKEN_VAR, shutdown_signal};
use tandem::{Error, Result};

/// Arguments of `tandem ps`.
#[derive(Args, Debug)]
pub struct PsArgs {
    /// Address to serve on (default: this task's address in TF_CONFIG).
    #[arg(long)]
    bind: Option<String>,
    /// This server's index (default: the task index).
    #[arg(long)]
    index: Option<usize>,
    /// Checkpoint directory; a checkpoint there is restored at start.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Write a checkpoint every N versions (0: only on request).
    #[arg(long, default_value_t = 0)]
    checkpoint_every: u64,
    /// Serve Prometheus metrics on this address (`/metrics`).
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Seconds between stats log lines.
    #[arg(long, default_value_t = 30)]
    log_every: u64,
    /// Keep serving after every worker is done.
    #[arg(long)]
    keep_running: bool,
    /// Stop (after a final checkpoint, if configured) with an error naming them when every worker
    /// that has not said done has been silent this many seconds.
    #[arg(long, value_name = "SECS")]
    worker_timeout: Option<u64>,
    /// Sync mode: a worker silent this many seconds (no call in progress) is gone; steps need the
    /// live workers only and its late push is refused until it pushes for the current step.
    /// Must exceed a worker's compute between its pull and its push.
    #[arg(long, value_name = "SECS", value_parser = parse_lease)]
    worker_lease: Option<f64>,
    /// Also serve a standby of the server at ADDR (primary-backup replication): it holds that
    /// server's state, updated before each update is published, and takes its partitions over
    /// when a worker cannot reach it.
    #[arg(long, value_name = "ADDR", conflicts_with = "replicate")]
    follow: Option<String>,
    /// Replicate every server: this one serves a standby of the previous server of TF_CONFIG's
    /// `ps` list (the first one of the last). Give every server the flag.
    #[arg(long)]
    replicate: bool,
}

/// A lease in seconds: positive and finite.
fn parse_lease(s: &str) -> Result<f64> {
    let v: f64 = s.parse().map_err(|_| {
        Error::invalid(
            "--worker-lease",
            format!("{s:?} is not a number of seconds"),
        )
    })?;
    if v.is_finite() && v > 0.0 && v <= 86_400.0 {
        Ok(v)
    } else {
        Err(Error::invalid(
            "--worker-lease",
            format!("{s} must be more than 0 and at most 86400 seconds"),
        ))
    }
}

/// Runs the server until the workers are done, Ctrl-C or SIGTERM.
pub fn ps(args: PsArgs) -> Result<ExitCode> {
    let token = JobToken::from_env()?.ok_or_else(|| {
        Error::config(
            TOKEN_VAR,
            "is not set; the parameter server refuses to run without a job token",
        )
    })?;
    let (bind, index, servers) = where_to_serve(&args)?;
    let mut config = ServerConfig::new(token);
    config.follow = follow_config(&args, &bind, index)?;
    config.exit_when_done = !args.keep_running;
    config.worker_timeout = args.worker_timeout.map(Duration::from_secs);
    config.worker_lease = args.worker_lease.map(Duration::from_secs_f64);
    if let Some(dir) = args.checkpoint_dir.clone() {
        config.checkpoint = Some(CheckpointPolicy {
            dir,
            index,
            every: args.checkpoint_every,
        });
    }
    let config_follow = config.follow.clone();
    crate::runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&bind)
            .await
            .map_err(|e| Error::io(format!("binding the parameter server to {bind}"), e))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::io("reading the server address", e))?;
        let server = Server::new(config).await?;
        let service = server.service();
        tandem::ps::server::observe(index, servers, &service);
        if let Some(addr) = &args.metrics_addr {
            tandem::observe::serve(addr)
                .map_err(|e| Error::io(format!("serving metrics at {addr}"), e))?;
        }
        println!("tandem ps {index}: serving on {local}");
        if let (Some(f), Some(a)) = (&config_follow, server.standby_address()) {
            println!("tandem ps {index}: standby of {} on {a}", f.primary);
        }
        let logger = tokio::spawn(log_summaries(
            service.clone(),
            index,
            Duration::from_secs(args.log_every.max(1)),
        ));
        let r = server.run(listener, shutdown_signal()).await;
        logger.abort();
        if let Some(m) = service.model() {
            println!("tandem ps {index}: done; {}", summary(&m));
        }
        r
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Logs (and prints) the server's summary every `every`, until aborted.
async fn log_summaries(service: tandem::ps::server::Service, index: usize, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        if let Some(m) = service.model() {
            tracing::info!("ps {index}: {}", summary(&m));
            println!("tandem ps {index}: {}", summary(&m));
        }
    }
}

/// Whom this server's standby follows (`--follow`, or with `--replicate` the previous server of
/// TF_CONFIG), listening on the host this server binds, any port.
fn follow_config(args: &PsArgs, bind: &str, index: usize) -> Result<Option<FollowConfig>> {
    let primary = match (&args.follow, args.replicate) {
        (Some(a), _) => a.clone(),
        (None, false) => return Ok(None),
        (None, true) => {
            let spec = ClusterSpec::from_env()?;
            let servers = spec.peers().get(&Role::Ps).map_or(0, |p| p.len());
            if servers < 2 {
                return Err(Error::config(
                    "--replicate",
                    format!("needs at least 2 parameter servers in TF_CONFIG, found {servers}"),
                ));
            }
            let previous = (index + servers - 1) % servers;
            spec.peer(Role::Ps, previous)
                .ok_or_else(|| Error::config("TF_CONFIG", format!("no address for ps {previous}")))?
                .to_string()
        }
    };
    tandem::cluster::check_address("--follow", &primary)?;
    let host = bind.rsplit_once(':').map_or(bind, |(h, _)| h).to_string();
    Ok(Some(FollowConfig {
        primary,
        bind: format!("{host}:0"),
    }))
}

/// The address to bind, this server's index and how many servers there are: `--bind` (and
/// `--index`), or this process's entry among the servers of `TF_CONFIG`.
fn where_to_serve(args: &PsArgs) -> Result<(String, usize, usize)> {
    if let Some(b) = &args.bind {
        let index = args.index.unwrap_or(0);
        return Ok((b.clone(), index, index + 1));
    }
    let spec = ClusterSpec::from_env()?;
    if spec.role() != Role::Ps {
        return Err(Error::config(
            "TF_CONFIG",
            format!(
                "this process is {} {}, not a parameter server; pass --bind to run one anyway",
                spec.role(),
                spec.index()
            ),
        ));
    }
    let index = args.index.unwrap_or(spec.index());
    let addr = spec
        .peer(Role::Ps, index)
        .ok_or_else(|| Error::config("TF_CONFIG", format!("no address for ps {index}")))?
        .to_string();
    let servers = spec.peers().get(&Role::Ps).map_or(index + 1, |p| p.len());
    let others: Vec<String> = spec
        .peers()
        .values()
        .flat_map(|v| v.values().cloned())
        .filter(|a| *a != addr)
        .collect();
    let bind = tandem::cluster::listen_address(&addr, &others)?;
    Ok((bind, index, servers))
}

#[cfg(test)]
mod tests {
    use super::parse_lease;

    #[test]
    fn a_lease_is_a_positive_finite_number_of_seconds_up_to_a_day() {
        assert_eq!(parse_lease("0.5").ok(), Some(0.5));
        assert_eq!(parse_lease("86400").ok(), Some(86_400.0));
        for bad in ["0", "-1", "86400.5", "inf", "NaN", "soon"] {
            let e = parse_lease(bad).expect_err(bad).to_string();
            assert!(
                e.contains("--worker-lease") && (e.contains(bad) || e.contains("seconds")),
                "{bad}: {e}"
            );
        }
    }
}
