//! Starting the planned processes and watching them until the job ends.
//!
//! Why a supervisor and not just `spawn` and `wait`: a distributed job is only as alive as its
//! least alive process. When one fails the others would wait on it until their deadlines, so the
//! supervisor stops them at once (SIGTERM, then SIGKILL, to whole process groups so grandchildren
//! go too) and reports the first failure with its rank and exit status; a restart policy may start
//! a failed process again instead. It also owns what users see: each process's output prefixed
//! with its role and rank (or handed to a [`LineSink`]) and copied to a log file per process.
//! Every wait is bounded: the poll loop checks an interrupt flag and the job's deadline.

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tandem_core::{Error, Result};
use tandem_rendezvous::{Host, JobToken, ServerConfig, TOKEN_VAR};

use crate::plan::{JobSpec, Layout, LineSink, Planned, Restart, plan};
use crate::tls::JobTls;

/// How long stopped processes get between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(5);
/// How long servers get to exit by themselves once every worker is done.
const SERVER_GRACE: Duration = Duration::from_secs(30);
/// How often the children are polled.
const POLL: Duration = Duration::from_millis(20);

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The exit code `launch` should end with: 0, the failed process's code, or 130 when interrupted.
    pub code: i32,
    /// One line saying who failed and why (or that every process succeeded).
    pub summary: String,
    /// The folder of per-process logs, when there is one.
    pub log_dir: Option<PathBuf>,
}

/// One process of the job: its plan, the child while it runs, its restarts and exit, its log
/// file, its process group and output forwarders.
struct Proc {
    /// What it runs.
    plan: Planned,
    /// The child while it runs.
    child: Option<Child>,
    /// Restarts so far.
    restarts: u32,
    /// Its exit, once it exited.
    exit: Option<ExitStatus>,
    /// Its log file.
    log: Option<Arc<Mutex<File>>>,
    /// Process group of the latest start (its leader's pid), kept after the leader exits.
    pgid: Option<i32>,
    /// The threads copying its output.
    forwarders: Vec<JoinHandle<()>>,
    /// Its TLS folder (its own certificate), when the launcher made the job's.
    tls: Option<PathBuf>,
}

/// Runs the job to its end. `interrupted` is polled while it runs (Ctrl-C in the caller): when it
/// returns true every process is stopped and the outcome has code 130. `deadline` bounds the whole
/// job (processes still running then are stopped).
pub fn run(
    spec: &JobSpec,
    deadline: Option<Duration>,
    interrupted: &dyn Fn() -> bool,
) -> Result<Outcome> {
    spec.validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tandem-launch")
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the launcher's runtime", e))?;
    let log_dir = make_log_dir(spec)?;
    let tls = JobTls::make(log_dir.as_deref(), spec)?;
    // The launcher's rendezvous is secured as its processes will be.
    let security = rendezvous_security(spec, tls.as_ref())?;
    let token = JobToken::generate();
    let host = rt.block_on(Host::bind(
        &format!("{}:0", spec.host),
        ServerConfig::new(token.clone()).with_security(security),
    ))?;
    let ports = reserve_ports(spec)?;
    let planned = plan(spec, &host.addr().to_string(), &ports)?;
    let tls_dirs = match &tls {
        Some(t) => t.issue(spec, &planned)?.into_iter().map(Some).collect(),
        None => vec![None; planned.len()],
    };
    let colour = std::io::stdout().is_terminal();
    let width = planned.iter().map(|p| p.label().len()).max().unwrap_or(0);
    let mut procs = Vec::with_capacity(planned.len());
    for (p, tls) in planned.into_iter().zip(tls_dirs) {
        procs.push(Proc::new(p, tls, log_dir.as_deref())?);
    }
    let style = Style {
        colour,
        width,
        prefix: spec.prefix,
        sink: spec.sink.clone(),
        log_dir: log_dir.clone(),
    };
    for i in 0..procs.len() {
        if let Err(e) = start(&mut procs[i], &token, &style) {
            stop_all(&mut procs);
            let _ = rt.block_on(host.stop());
            return Err(e);
        }
    }
    let outcome = supervise(spec, &mut procs, &token, &style, deadline, interrupted);
    stop_all(&mut procs);
    for p in &mut procs {
        join_forwarders(p);
    }
    let _ = rt.block_on(host.stop());
    Ok(Outcome { log_dir, ..outcome })
}

/// `job-<time>-<pid>` under the spec's log folder, made now; `None` without one.
fn make_log_dir(spec: &JobSpec) -> Result<Option<PathBuf>> {
    let Some(base) = &spec.log_dir else {
        return Ok(None);
    };
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let dir = base.join(format!("job-{stamp}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(format!("creating the log folder {}", dir.display()), e))?;
    Ok(Some(dir))
}

/// How the launcher's rendezvous is secured: as its processes will be (the spec's and this
/// process's variables, with a certificate of its own when the launcher made the job's).
fn rendezvous_security(spec: &JobSpec, tls: Option<&JobTls>) -> Result<tandem_tls::Security> {
    let mut env: std::collections::HashMap<String, String> = std::env::vars().collect();
    env.extend(spec.env.iter().cloned());
    if let Some(t) = tls {
        env.insert(
            tandem_tls::DIR_VAR.into(),
            t.issue_one(spec, "rendezvous")?.display().to_string(),
        );
    }
    tandem_tls::Security::from_vars(&env)
}

impl Proc {
    /// A process not started yet, its output also written to `<role>-<index>.log` in `log_dir`.
    fn new(plan: Planned, tls: Option<PathBuf>, log_dir: Option<&std::path::Path>) -> Result<Proc> {
        let log = match log_dir {
            Some(dir) => {
                let path = dir.join(format!("{}-{}.log", plan.role, plan.index));
                let f = File::create(&path)
                    .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
                Some(Arc::new(Mutex::new(f)))
            }
            None => None,
        };
        Ok(Proc {
            plan,
            child: None,
            restarts: 0,
            exit: None,
            log,
            pgid: None,
            forwarders: Vec::new(),
            tls,
        })
    }
}

/// Picks one free loopback port per process for the addresses a `TF_CONFIG` lists, or, for an
/// allreduce job, one for `MASTER_PORT` (where rank 0 of a `torch.distributed` job binds its store).
fn reserve_ports(spec: &JobSpec) -> Result<Vec<u16>> {
    let n = match spec.layout {
        Layout::Allreduce { .. } => 1,
        Layout::Ps { ps, workers, .. } => ps + workers,
    };
    // Hold every listener until all are chosen so no port is picked twice.
    let listeners = (0..n)
        .map(|_| {
            std::net::TcpListener::bind((spec.host.as_str(), 0))
                .map_err(|e| Error::io(format!("reserving a port on {}", spec.host), e))
        })
        .collect::<Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(|e| Error::io("reading a reserved port", e))
        })
        .collect()
}

/// How the processes' output lines are shown and kept.
struct Style {
    /// Whether lines are coloured (a terminal).
    colour: bool,
    /// Width of the labels.
    width: usize,
    /// Whether lines get their process's label.
    prefix: bool,
    /// Where lines also go (the caller's own handling).
    sink: Option<LineSink>,
    /// The job's log folder: processes write their flight-recorder dumps under it.
    log_dir: Option<PathBuf>,
}

impl Style {
    /// The prefix of a process's lines: its label, padded, coloured by rank on a terminal.
    fn tag(&self, p: &Planned) -> String {
        if !self.prefix {
            return String::new();
        }
        let name = format!("{:<w$}", p.label(), w = self.width);
        if self.colour {
            /// ANSI colours, one per rank in turn.
            const COLOURS: [u8; 6] = [36, 33, 32, 35, 34, 31];
            let c = COLOURS[p.rank % COLOURS.len()];
            format!("\x1b[{c}m[{name}]\x1b[0m ")
        } else {
            format!("[{name}] ")
        }
    }
}

/// The metrics address of a process of a parameter-server job: its processes all resolve local
/// rank 0 from their `TF_CONFIG`, so each gets its own port here (the base port plus its rank in
/// the job). Allreduce ranks add their local rank themselves.
fn metrics_addr(p: &Planned) -> Option<String> {
    let has = |k: &str| p.env.iter().any(|(name, _)| name == k);
    if !has("TF_CONFIG") {
        return None;
    }
    let (_, base) = p
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == tandem_core::settings::METRICS_ADDR.name)?;
    let (host, port) = base.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let port = if port == 0 {
        0
    } else {
        u16::try_from(usize::from(port) + p.rank).ok()?
    };
    Some(format!("{host}:{port}"))
}

/// Starts (or restarts) a process in its own process group with the job's token and its
/// planned environment, forwarding its output.
fn start(p: &mut Proc, token: &JobToken, style: &Style) -> Result<()> {
    let mut cmd = Command::new(&p.plan.command[0]);
    cmd.args(&p.plan.command[1..])
        .envs(p.plan.env.iter().map(|(k, v)| (k, v)))
        .env(TOKEN_VAR, token.as_str())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so stopping it also stops what it started.
        .process_group(0);
    if let Some(addr) = metrics_addr(&p.plan) {
        cmd.env(tandem_core::settings::METRICS_ADDR.name, addr);
    }
    if let Some(dir) = &p.tls {
        cmd.env(tandem_tls::DIR_VAR, dir);
    }
    if let Some(dir) = &style.log_dir {
        // Flight-recorder dumps go to `trace/` beside the logs (unless TANDEM_TRACE_DIR says).
        cmd.env(tandem_core::settings::LOG_DIR.name, dir);
    }
    let mut child = cmd.spawn().map_err(|e| {
        Error::io(
            format!("starting {} ({:?})", p.plan.name(), p.plan.command[0]),
            e,
        )
    })?;
    p.pgid = i32::try_from(child.id()).ok();
    let tag = style.tag(&p.plan);
    let to = |stderr: bool| Destination {
        tag: tag.clone(),
        log: p.log.clone(),
        stderr,
        sink: style.sink.clone().map(|s| (s, p.plan.clone())),
    };
    if let Some(out) = child.stdout.take() {
        p.forwarders.push(forward(out, to(false)));
    }
    if let Some(err) = child.stderr.take() {
        p.forwarders.push(forward(err, to(true)));
    }
    p.child = Some(child);
    p.exit = None;
    Ok(())
}

/// Where one pipe of a process goes.
struct Destination {
    /// The label put before each line.
    tag: String,
    /// The log file.
    log: Option<Arc<Mutex<File>>>,
    /// Whether it is the process's stderr.
    stderr: bool,
    /// The caller's handler, with the process it is for.
    sink: Option<(LineSink, Planned)>,
}

/// Copies a child's output line by line to `to`, on a thread of its own.
fn forward(pipe: impl std::io::Read + Send + 'static, to: Destination) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        // Lines are bounded by the child's own writes; read_until keeps invalid UTF-8 intact.
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            if line.last() != Some(&b'\n') {
                line.push(b'\n');
            }
            if let Some(f) = &to.log
                && let Ok(mut f) = f.lock()
            {
                let _ = f.write_all(&line);
            }
            if let Some((sink, plan)) = &to.sink {
                let text = String::from_utf8_lossy(&line[..line.len() - 1]);
                (sink.0)(plan, &text, to.stderr);
            } else {
                let mut out: Vec<u8> = Vec::with_capacity(to.tag.len() + line.len());
                out.extend_from_slice(to.tag.as_bytes());
                out.extend_from_slice(&line);
                let _ = if to.stderr {
                    std::io::stderr().lock().write_all(&out)
                } else {
                    std::io::stdout().lock().write_all(&out)
                };
            }
            line.clear();
        }
    })
}

/// An exit status as the launcher's code (128 + signal when killed) and words.
fn describe(status: ExitStatus) -> (i32, String) {
    match (status.code(), status.signal()) {
        (Some(c), _) => (c, format!("exited with code {c}")),
        (None, Some(s)) => {
            let name = Signal::try_from(s)
                .map(|s| s.as_str())
                .unwrap_or("a signal");
            (128 + s, format!("was killed by {name}"))
        }
        _ => (1, "ended for an unknown reason".into()),
    }
}

/// Waits for the job to end (every process done, one failed past its restarts, the deadline or
/// an interruption), restarting processes as the spec allows.
fn supervise(
    spec: &JobSpec,
    procs: &mut [Proc],
    token: &JobToken,
    style: &Style,
    deadline: Option<Duration>,
    interrupted: &dyn Fn() -> bool,
) -> Outcome {
    let started = Instant::now();
    let mut trainers_done_at: Option<Instant> = None;
    loop {
        if let Some(o) = stopped(procs, started, deadline, interrupted) {
            return o;
        }
        if let Some(o) = reap(spec, procs, token, style) {
            return o;
        }
        if let Some(o) = all_done(procs, &mut trainers_done_at) {
            return o;
        }
        std::thread::sleep(POLL);
    }
}

/// The outcome of the job: its code and summary.
fn outcome(code: i32, summary: String) -> Outcome {
    Outcome {
        code,
        summary,
        log_dir: None,
    }
}

/// An interrupt, or the job's deadline passed.
fn stopped(
    procs: &[Proc],
    started: Instant,
    deadline: Option<Duration>,
    interrupted: &dyn Fn() -> bool,
) -> Option<Outcome> {
    if interrupted() {
        let running = procs.iter().filter(|p| p.child.is_some()).count();
        return Some(outcome(
            130,
            format!("interrupted; stopped {running} running processes"),
        ));
    }
    let d = deadline.filter(|d| started.elapsed() >= *d)?;
    let running: Vec<String> = procs
        .iter()
        .filter(|p| p.child.is_some())
        .map(|p| p.plan.name())
        .collect();
    Some(outcome(
        124,
        format!(
            "the job ran past its {d:?} deadline; stopped {}",
            running.join(", ")
        ),
    ))
}

/// Notes processes that exited: a success is kept, a failure is restarted while the policy allows,
/// and otherwise ends the job.
fn reap(spec: &JobSpec, procs: &mut [Proc], token: &JobToken, style: &Style) -> Option<Outcome> {
    for i in 0..procs.len() {
        let Some(child) = procs[i].child.as_mut() else {
            continue;
        };
        let status = match child.try_wait() {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                return Some(outcome(
                    1,
                    format!("could not watch {}: {e}", procs[i].plan.name()),
                ));
            }
        };
        procs[i].child = None;
        procs[i].exit = Some(status);
        if status.success() {
            continue;
        }
        let (code, why) = describe(status);
        let p = &mut procs[i];
        if let Restart::OnFailure { max } = spec.restart
            && p.restarts < max
        {
            p.restarts += 1;
            eprintln!(
                "tandem launch: {} {why}; restarting it ({} of {max})",
                p.plan.name(),
                p.restarts
            );
            join_forwarders(p);
            if let Err(e) = start(p, token, style) {
                return Some(outcome(
                    1,
                    format!("could not restart {}: {e}", p.plan.name()),
                ));
            }
            continue;
        }
        let others = procs.iter().filter(|q| q.child.is_some()).count();
        if let Some((min, _)) = spec.elastic {
            // An elastic job goes on without the rank while enough remain (they re-form).
            let alive = procs
                .iter()
                .filter(|q| q.plan.trains() && q.child.is_some())
                .count();
            let p = &procs[i];
            if alive >= min {
                eprintln!(
                    "tandem launch: {} (rank {}) {why}; retired, the job goes on with {alive} (elastic, at least {min})",
                    p.plan.name(),
                    p.plan.rank
                );
                continue;
            }
        }
        let p = &procs[i];
        let restarts = match spec.restart {
            Restart::Never => String::new(),
            Restart::OnFailure { .. } => format!(" after {} restarts", p.restarts),
        };
        return Some(outcome(
            code,
            format!(
                "{} (rank {}) {why}{restarts}; stopped {others} other processes",
                p.plan.name(),
                p.plan.rank
            ),
        ));
    }
    None
}

/// Every process succeeded, or every trainer did and the servers had their grace period.
fn all_done(procs: &[Proc], trainers_done_at: &mut Option<Instant>) -> Option<Outcome> {
    if procs.iter().any(|p| p.plan.trains() && p.child.is_some()) {
        return None;
    }
    if !procs.iter().any(|p| p.child.is_some()) {
        let retired = procs
            .iter()
            .filter(|p| p.exit.is_some_and(|s| !s.success()))
            .count();
        let summary = if retired == 0 {
            format!("all {} processes succeeded", procs.len())
        } else {
            format!(
                "{} processes succeeded; {retired} failed and were retired (elastic)",
                procs.len() - retired
            )
        };
        return Some(outcome(0, summary));
    }
    // Servers normally exit once every worker said it is done; give them a while.
    let since = *trainers_done_at.get_or_insert_with(Instant::now);
    if since.elapsed() < SERVER_GRACE {
        return None;
    }
    eprintln!(
        "tandem launch: every worker is done; stopping the servers still running after {SERVER_GRACE:?}"
    );
    Some(outcome(
        0,
        format!(
            "all {} workers succeeded",
            procs.iter().filter(|p| p.plan.trains()).count()
        ),
    ))
}

/// Sends `signal` to a child's whole process group.
fn signal_group(child: &Child, signal: Signal) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

/// Stops every running process: SIGTERM to its process group, then SIGKILL after [`GRACE`].
fn stop_all(procs: &mut [Proc]) {
    for p in procs.iter() {
        if let Some(c) = &p.child {
            signal_group(c, Signal::SIGTERM);
        }
    }
    let end = Instant::now() + GRACE;
    loop {
        let mut running = false;
        for p in procs.iter_mut() {
            if let Some(c) = p.child.as_mut() {
                match c.try_wait() {
                    Ok(Some(s)) => {
                        p.exit = Some(s);
                        p.child = None;
                    }
                    Ok(None) => running = true,
                    Err(_) => p.child = None,
                }
            }
        }
        if !running {
            break;
        }
        if Instant::now() >= end {
            for p in procs.iter_mut() {
                if let Some(mut c) = p.child.take() {
                    signal_group(&c, Signal::SIGKILL);
                    let _ = c.kill();
                    p.exit = c.wait().ok();
                }
            }
            break;
        }
        std::thread::sleep(POLL);
    }
    // Members of a group whose leader already exited (what a process left behind): no orphans.
    for p in procs.iter_mut() {
        if let Some(pgid) = p.pgid.take() {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}

/// Waits for a process's output forwarders to drain.
fn join_forwarders(p: &mut Proc) {
    // Pipes close when the process group is gone; do not wait forever on a grandchild that escaped it.
    let end = Instant::now() + Duration::from_secs(2);
    for f in p.forwarders.drain(..) {
        while !f.is_finished() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        if f.is_finished() {
            let _ = f.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(rank: usize, env: &[(&str, &str)]) -> Planned {
        Planned {
            role: tandem_core::Role::Worker,
            index: rank,
            rank,
            command: vec!["x".into()],
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn processes_of_a_ps_job_get_a_metrics_port_each() {
        let ps = |rank, addr| planned(rank, &[("TF_CONFIG", "{}"), ("TANDEM_METRICS_ADDR", addr)]);
        assert_eq!(
            metrics_addr(&ps(3, "127.0.0.1:9400")).as_deref(),
            Some("127.0.0.1:9403")
        );
        assert_eq!(
            metrics_addr(&ps(0, "127.0.0.1:9400")).as_deref(),
            Some("127.0.0.1:9400")
        );
        assert_eq!(metrics_addr(&ps(5, "h:0")).as_deref(), Some("h:0"));
        assert_eq!(metrics_addr(&ps(1, "h:65535")), None);
        assert_eq!(metrics_addr(&ps(1, "nonsense")), None);
        // Allreduce ranks offset by their own local rank.
        assert_eq!(
            metrics_addr(&planned(2, &[("TANDEM_METRICS_ADDR", "h:9400")])),
            None
        );
        assert_eq!(metrics_addr(&planned(2, &[("TF_CONFIG", "{}")])), None);
    }
}
