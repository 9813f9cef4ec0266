//! `tandem bench ps`: W workers and S parameter servers on this machine, pulling and pushing one
//! parameter of P f32 values with a trivial gradient, in sync or async mode.
//!
//! Why a trivial gradient: what is measured is the parameter server (moving, checking, summing and
//! applying bytes), not a model; each process is its own OS process as in a real job, each
//! server's peak RSS is reported next to the rate, and with `--hosts` they run on simulated hosts
//! with the link bound printed beside the result.
//!
//! What a run prints (`tandem bench ps --workers 2 --servers 1 --params 100K --steps 20`, a debug
//! build, figures for shape only):
//!
//! ```text
//! # connections: mutual TLS
//! # replication: none
//! # tandem bench ps: 2 workers, 1 servers, 100000 f32 params, Sync, 20 steps per worker
//! global steps/s: 83.50   GB/s (pull+push): 0.13   step p50 10.1 ms  p99 24.1 ms   training 0.24 s (with start-up 0.35 s)
//! # peak RSS MiB: servers 45  workers 39 39
//! ```
//!
//! The rate is global steps per second in sync mode (gradients per second in async mode), over the
//! training loops only (from the first worker's first step to the last worker's last); the wall time
//! with the processes' start and connection is printed beside it. `GB/s` counts each step's pull and
//! push of every parameter. `--csv` appends one row per run, `--observe-cost` alternates batches with
//! the recorder and metrics on and off and prints their ratio, and `--replicate` makes every server
//! also a standby of the previous one, to measure what primary-backup replication costs.

use crate::ExitCode;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use clap::{Args, ValueEnum};
use tandem::rendezvous::{JobToken, TOKEN_VAR};
use tandem::{Error, Result};

use crate::memory::peak_rss_of;

/// Sync or async training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PsMode {
    /// Synchronous steps over all workers.
    Sync,
    /// Asynchronous updates.
    Async,
}

/// Arguments of `tandem bench ps`.
#[derive(Args, Debug, Clone)]
pub struct BenchPsArgs {
    /// Workers.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Parameter servers.
    #[arg(long, default_value_t = 2)]
    servers: usize,
    /// f32 parameters (K, M suffixes: powers of 1000).
    #[arg(long, default_value = "10M")]
    params: String,
    /// Sync or async.
    #[arg(long, value_enum, default_value_t = PsMode::Sync)]
    mode: PsMode,
    /// Steps per worker.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Append a CSV line here.
    #[arg(long)]
    csv: Option<String>,
    /// Run on this many simulated hosts (network namespaces; needs root): server i on host
    /// i mod H, worker w on host (servers + w) mod H, so with H = servers + workers each process
    /// has a host and every tensor crosses a link.
    #[arg(long)]
    hosts: Option<usize>,
    /// Connections in plaintext (TANDEM_INSECURE=1) instead of mutual TLS, to measure what TLS
    /// costs.
    #[arg(long)]
    insecure: bool,
    /// Shape each host's link to this rate (`2gbit`, `10gbit`) and print the link bound.
    #[arg(long)]
    link: Option<String>,
    /// Measure what the flight recorder and the metrics cost the workers: each worker records
    /// every other step only, and the summary compares the step times of both halves.
    #[arg(long)]
    observe_cost: bool,
    /// Replicate every server (primary-backup): server i also serves a standby of server i - 1
    /// (the first one of the last), so every update is sent to a standby before it is published.
    /// Measures what replication costs; needs at least 2 servers.
    #[arg(long)]
    replicate: bool,
    /// Cut the model into partitions of at most this many bytes (0: one per tensor and server),
    /// so a step's pulls overlap its pushes partition by partition (BytePS cuts at 4 MB too).
    #[arg(long, default_value_t = 4 << 20)]
    max_partition_bytes: usize,
    /// Each worker pushes, then pulls (instead of pushing and pulling the next step at once):
    /// measures what the overlap brings.
    #[arg(long)]
    sequential: bool,
    /// Compress pushes and pulls through the gRPC streams (`none`, `bf16`, `fp16`,
    /// `topk:FRACTION`, `auto`), servers and workers alike (`TANDEM_COMPRESSION` for all of them).
    /// Transfers by address between processes of one machine are never compressed: measure it on
    /// simulated hosts.
    #[arg(long, default_value = "none")]
    compression: String,
}

/// Where the bench's processes run: here, or on simulated hosts.
enum Placement {
    /// On this machine.
    Here,
    /// On simulated hosts.
    Hosts(tandem_testbed::Testbed),
}

impl Placement {
    /// A command running Tandem's CLI (`cli`, as words) with `args` for process `i` (servers
    /// first, then workers, in one numbering), and the address a server there binds.
    fn command(&self, cli: &[String], i: usize, args: &[String]) -> (Command, String) {
        let (program, words) = cli
            .split_first()
            .map_or(("tandem", &[][..]), |(p, w)| (p.as_str(), w));
        match self {
            Placement::Here => {
                let mut c = Command::new(program);
                c.args(words).args(args);
                (c, "127.0.0.1:0".into())
            }
            Placement::Hosts(bed) => {
                let host = i % bed.len();
                let args: Vec<&str> = words.iter().chain(args).map(String::as_str).collect();
                let c = bed.command(host, program, &args);
                (c, format!("{}:{}", bed.addr(host), 29600 + i))
            }
        }
    }

    /// The pid (as seen here) of a process [`Placement::command`] started.
    fn pid(&self, c: &Child) -> u32 {
        match self {
            Placement::Here => c.id(),
            Placement::Hosts(_) => tandem_testbed::Testbed::pid_of(c).unwrap_or(0),
        }
    }
}

/// `--params`: a plain count or one with a suffix (`100K`, `10M`).
fn parse_count(s: &str) -> Result<usize> {
    crate::local_job::parse_scaled("--params", s, 1000, "a count such as 1000, 100K or 10M")
}

/// `--compression` as the variable every process of the job gets, checked and printed.
fn compression_var(name: &str) -> Result<(String, String)> {
    let compression = tandem::ps::wire::check_setting(name.parse()?)?;
    println!("# compression: {compression}");
    let var = tandem::settings::COMPRESSION.name;
    Ok((var.to_string(), compression.to_string()))
}

/// Kills and reaps the benchmark's processes (servers left running after the workers ended).
fn stop(children: &mut [Child]) {
    for c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Runs the benchmark and prints one summary.
pub fn bench_ps(a: BenchPsArgs) -> Result<ExitCode> {
    let params = parse_count(&a.params)?;
    if a.workers == 0 || a.servers == 0 || a.workers > 64 || a.servers > 64 {
        return Err(Error::invalid(
            "--workers/--servers",
            "must be between 1 and 64",
        ));
    }
    let exe = tandem_launch::cli_command();
    let hosts = crate::hosts::Hosts::from_flags(a.hosts, 1, a.link.as_deref())?;
    let placement = match &hosts {
        Some(h) => {
            println!(
                "# {} simulated hosts, links {}",
                h.hosts,
                h.link.as_ref().map_or("unshaped", |(_, l)| l.as_str())
            );
            Placement::Hosts(h.testbed()?)
        }
        None => Placement::Here,
    };
    let transport = crate::hosts::JobTransport::new(a.insecure)?;
    println!("# connections: {}", transport.name());
    let mut env = transport.env();
    env.push(compression_var(&a.compression)?);
    let token = JobToken::generate();
    if a.replicate && a.servers < 2 {
        return Err(Error::invalid(
            "--replicate",
            "needs at least 2 servers (each one's standby runs in the next)",
        ));
    }
    println!(
        "# replication: {}",
        if a.replicate {
            "every server has a standby in the next one"
        } else {
            "none"
        }
    );
    let (mut servers, addrs) =
        start_servers(&placement, &exe, &token, &env, a.servers, a.replicate)?;
    let start = Instant::now();
    let workers = match start_workers(&placement, &exe, &token, &env, &a, &addrs, params) {
        Ok(w) => w,
        Err(e) => {
            stop(&mut servers);
            return Err(e);
        }
    };
    // On simulated hosts a signal must not leave them behind: it kills the job's processes, so
    // this returns and the hosts are removed.
    let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if matches!(placement, Placement::Hosts(_)) {
        let pids = servers.iter().chain(&workers).map(Child::id).collect();
        crate::hosts::kill_on_signal(pids, finished.clone());
    }
    let results = collect(workers);
    finished.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = results?;
    let wall = start.elapsed().as_secs_f64();
    let server_rss: Vec<u64> = servers
        .iter()
        .map(|c| peak_rss_of(placement.pid(c)))
        .collect();
    stop(&mut servers);
    if !results.failed.is_empty() {
        eprintln!("tandem bench ps: failed: {}", results.failed.join(", "));
        return Ok(ExitCode::from(1));
    }
    let link = hosts
        .as_ref()
        .and_then(crate::hosts::Hosts::link_bytes_per_s);
    report(&a, params, wall, results, &server_rss, link)?;
    Ok(ExitCode::SUCCESS)
}

/// Starts `n` `tandem ps` processes on ephemeral loopback ports; returns them and their addresses.
fn start_servers(
    placement: &Placement,
    exe: &[String],
    token: &JobToken,
    env: &[(String, String)],
    n: usize,
    replicate: bool,
) -> Result<(Vec<Child>, Vec<String>)> {
    let mut servers = Vec::new();
    let mut addrs = Vec::new();
    // With replication every server must know the previous one's address before it starts.
    let binds: Vec<String> = (0..n)
        .map(|i| {
            let (_, bind) = placement.command(exe, i, &[]);
            match (replicate, bind.strip_suffix(":0")) {
                (true, Some(host)) => std::net::TcpListener::bind(format!("{host}:0"))
                    .and_then(|l| l.local_addr())
                    .map(|a| a.to_string())
                    .map_err(|e| Error::io("choosing a port for a server", e)),
                _ => Ok(bind),
            }
        })
        .collect::<Result<_>>()?;
    for i in 0..n {
        let bind = &binds[i];
        let mut args: Vec<String> = [
            "ps",
            "--bind",
            bind,
            "--index",
            &i.to_string(),
            "--keep-running",
            "--log-every",
            "3600",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if replicate {
            args.extend(["--follow".to_string(), binds[(i + n - 1) % n].clone()]);
        }
        let (mut cmd, _) = placement.command(exe, i, &args);
        let spawned = cmd
            .env(TOKEN_VAR, token.as_str())
            .envs(env.iter().cloned())
            .stdout(Stdio::piped())
            .spawn();
        let mut c = match spawned {
            Ok(c) => c,
            Err(e) => {
                stop(&mut servers);
                return Err(Error::io("starting a parameter server", e));
            }
        };
        let Some(stdout) = c.stdout.take() else {
            servers.push(c);
            stop(&mut servers);
            return Err(Error::transport("bench", "a server has no stdout"));
        };
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().and_then(|l| l.ok()).unwrap_or_default();
        let addr = first.rsplit(' ').next().unwrap_or_default().to_string();
        std::thread::spawn(move || for _ in lines {});
        addrs.push(addr);
        servers.push(c);
    }
    Ok((servers, addrs))
}

/// Starts the workers (`tandem bench-ps-worker`), each reporting its step times on stdout.
fn start_workers(
    placement: &Placement,
    exe: &[String],
    token: &JobToken,
    env: &[(String, String)],
    a: &BenchPsArgs,
    addrs: &[String],
    params: usize,
) -> Result<Vec<Child>> {
    let mut workers = Vec::new();
    for w in 0..a.workers {
        let mut args = vec![
            "bench-ps-worker".to_string(),
            format!("--servers={}", addrs.join(",")),
            format!("--worker={w}"),
            format!("--workers={}", a.workers),
            format!("--params={params}"),
            format!("--steps={}", a.steps),
        ];
        if a.mode == PsMode::Sync {
            args.push("--sync".into());
        }
        if a.observe_cost {
            args.push("--observe-cost".into());
        }
        if a.sequential {
            args.push("--sequential".into());
        }
        args.push(format!("--max-partition-bytes={}", a.max_partition_bytes));
        let (mut cmd, _) = placement.command(exe, a.servers + w, &args);
        match cmd
            .env(TOKEN_VAR, token.as_str())
            .envs(env.iter().cloned())
            .stdout(Stdio::piped())
            .spawn()
        {
            Ok(c) => workers.push(c),
            Err(e) => {
                stop(&mut workers);
                return Err(Error::io("starting a worker", e));
            }
        }
    }
    Ok(workers)
}

/// What the workers reported.
struct Results {
    /// Every step's time, ms.
    step_ms: Vec<f64>,
    /// With `--observe-cost`: step times with the recorder and metrics on, and off.
    on_ms: Vec<f64>,
    /// See `on_ms`.
    off_ms: Vec<f64>,
    /// Each worker's peak memory.
    worker_rss: Vec<u64>,
    /// What the workers that failed said.
    failed: Vec<String>,
    /// The training loops, first start to last end (seconds since the epoch), without the
    /// processes' start and connection.
    loop_start: f64,
    /// See `loop_start`.
    loop_end: f64,
}

/// Waits for every worker and gathers their reports.
fn collect(workers: Vec<Child>) -> Result<Results> {
    let mut r = Results {
        step_ms: Vec::new(),
        on_ms: Vec::new(),
        off_ms: Vec::new(),
        worker_rss: Vec::new(),
        failed: Vec::new(),
        loop_start: f64::INFINITY,
        loop_end: 0.0,
    };
    for (w, c) in workers.into_iter().enumerate() {
        let out = c
            .wait_with_output()
            .map_err(|e| Error::io("waiting for a worker", e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        match text
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
        {
            Some(v) if out.status.success() => {
                r.step_ms.extend(
                    v["step_ms"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|x| x.as_f64()),
                );
                let times = |k: &str| {
                    v[k].as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|x| x.as_f64())
                        .collect::<Vec<f64>>()
                };
                r.on_ms.extend(times("on_ms"));
                r.off_ms.extend(times("off_ms"));
                r.worker_rss.push(v["rss"].as_u64().unwrap_or(0));
                if let (Some(s), Some(e)) = (v["start"].as_f64(), v["end"].as_f64()) {
                    r.loop_start = r.loop_start.min(s);
                    r.loop_end = r.loop_end.max(e);
                }
            }
            _ => r.failed.push(format!("worker {w} ({})", out.status)),
        }
    }
    r.step_ms.sort_by(|x, y| x.total_cmp(y));
    Ok(r)
}

/// The rate the links allow when every process has a host and links of `link` bytes/s: in sync
/// mode a step pushes W gradients into the servers and then pulls the parameters out to W workers
/// (each server link carries W x 4P / S bytes each way, one after the other; a worker's link 4P
/// each way); in async mode pushes and pulls overlap across workers.
fn link_bound(a: &BenchPsArgs, params: usize, link: f64) -> f64 {
    let bytes = 4.0 * params as f64;
    let (w, s) = (a.workers as f64, a.servers as f64);
    if a.mode == PsMode::Sync {
        let server = link * s / (2.0 * w * bytes);
        let worker = link / (2.0 * bytes);
        server.min(worker)
    } else {
        let server = link * s / bytes;
        let worker = w * link / (2.0 * bytes);
        server.min(worker)
    }
}

/// Sync: the rate the links allow when a step's pulls overlap its pushes (links are full duplex:
/// each server link carries W x 4P / S bytes in and as many out at once).
fn overlapped_bound(a: &BenchPsArgs, params: usize, link: f64) -> f64 {
    let bytes = 4.0 * params as f64;
    let (w, s) = (a.workers as f64, a.servers as f64);
    (link * s / (w * bytes)).min(link / bytes)
}

/// Prints the summary (and appends the CSV line, when asked).
fn report(
    a: &BenchPsArgs,
    params: usize,
    wall: f64,
    r: Results,
    server_rss: &[u64],
    link: Option<f64>,
) -> Result<()> {
    let pct = |p: f64| {
        r.step_ms
            .get(((r.step_ms.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let (steps, pushes) = (a.steps as f64, (a.steps * a.workers) as f64);
    // Rates over the training loops (as a peer's benchmark times its loop, after its actors
    // started); the wall time with the processes' start is printed next to it.
    let trained = r.loop_end - r.loop_start;
    let total = wall;
    let wall = if trained > 0.0 && trained <= total {
        trained
    } else {
        total
    };
    let (rate, unit) = if a.mode == PsMode::Sync {
        (steps / wall, "global steps/s")
    } else {
        (pushes / wall, "gradients/s")
    };
    let gbs = pushes * params as f64 * 4.0 * 2.0 / wall / 1e9;
    let mib = |v: &[u64]| {
        v.iter()
            .map(|b| format!("{:.0}", *b as f64 / (1 << 20) as f64))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "# tandem bench ps: {} workers, {} servers, {params} f32 params, {:?}, {} steps per worker",
        a.workers, a.servers, a.mode, a.steps
    );
    println!(
        "{unit}: {rate:.2}   GB/s (pull+push): {gbs:.2}   step p50 {:.1} ms  p99 {:.1} ms   training {wall:.2} s (with start-up {total:.2} s)",
        pct(0.5),
        pct(0.99)
    );
    println!(
        "# peak RSS MiB: servers {}  workers {}",
        mib(server_rss),
        mib(&r.worker_rss)
    );
    print_observe_cost(&r);
    if let Some(l) = link {
        print_link_bound(a, params, l, rate, unit);
    }
    if let Some(path) = &a.csv {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(format!("opening {path}"), e))?;
        let _ = writeln!(
            f,
            "tandem,{:?},{},{},{params},{rate:.3},{gbs:.3},{:.2},{:.2}",
            a.mode,
            a.workers,
            a.servers,
            pct(0.5),
            pct(0.99)
        );
    }
    Ok(())
}

/// With `--observe-cost`: the median step with the recorder and metrics on against off.
fn print_observe_cost(r: &Results) {
    if r.on_ms.is_empty() || r.off_ms.is_empty() {
        return;
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (on, off) = (median(&r.on_ms), median(&r.off_ms));
    println!(
        "# observe cost: step p50 with recorder and metrics on {on:.2} ms, off {off:.2} ms, on/off {:.4}",
        on / off
    );
}

/// On shaped links: the rate the servers' links allow, and how much of it was reached.
fn print_link_bound(a: &BenchPsArgs, params: usize, link: f64, rate: f64, unit: &str) {
    let bound = link_bound(a, params, link);
    if a.mode == PsMode::Sync {
        let overlapped = overlapped_bound(a, params, link);
        println!(
            "# link bound: {bound:.2} {unit} if each step pushes then pulls every parameter through the servers' links (reached {:.1}%); {overlapped:.2} if its pulls overlap its pushes (reached {:.1}%)",
            rate / bound * 100.0,
            rate / overlapped * 100.0
        );
    } else {
        println!(
            "# link bound: {bound:.2} {unit} (every gradient pushes and pulls every parameter through the servers' links); reached {:.1}%",
            rate / bound * 100.0
        );
    }
}
