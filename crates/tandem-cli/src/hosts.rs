//! Running a bench job on simulated hosts (`--hosts H [--ranks-per-host R] [--link RATE]`): what
//! a job would do across H machines joined by links of that rate, before renting them. The hosts
//! are network namespaces on this machine (`tandem-testbed`; needs root), so every byte between
//! hosts crosses a (shaped) link and no same-host copy can cross a host boundary.
//!
//! Why simulate: what only breaks across machines (addresses, bandwidth, a cut link) should be
//! seen before renting machines; namespaces give each host its own network stack and the shaped
//! links a real rate.
//!
//! `--link RATE` (`1gbit`, `10gbit`, ...) shapes every host's link with a token bucket; the bench
//! then prints the link's bound next to its result, so a figure reads as a share of what the wire
//! allows. Ctrl-C or SIGTERM stops the jobs and removes the hosts on the way out.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tandem::{Error, Result};
use tandem_testbed::Testbed;

/// Where a bench job runs across hosts.
#[derive(Debug, Clone)]
pub struct Hosts {
    /// Simulated hosts.
    pub hosts: usize,
    /// Ranks on each.
    pub per_host: usize,
    /// Link rate in bits per second, and as given (`2gbit`), when shaped.
    pub link: Option<(f64, String)>,
}

impl Hosts {
    /// From the flags; `None` without `--hosts`.
    pub fn from_flags(
        hosts: Option<usize>,
        per_host: usize,
        link: Option<&str>,
    ) -> Result<Option<Hosts>> {
        let Some(h) = hosts else {
            if link.is_some() {
                return Err(Error::invalid(
                    "--link",
                    "shapes the links of --hosts; give --hosts",
                ));
            }
            return Ok(None);
        };
        if !(1..=64).contains(&h) {
            return Err(Error::invalid(
                "--hosts",
                format!("{h} is not between 1 and 64"),
            ));
        }
        if !(1..=16).contains(&per_host) {
            return Err(Error::invalid(
                "--ranks-per-host",
                format!("{per_host} is not between 1 and 16"),
            ));
        }
        let link = link
            .map(|l| parse_rate(l).map(|bps| (bps, l.to_string())))
            .transpose()?;
        Ok(Some(Hosts {
            hosts: h,
            per_host,
            link,
        }))
    }

    /// The link rate in bytes per second, when shaped.
    pub fn link_bytes_per_s(&self) -> Option<f64> {
        self.link.as_ref().map(|(bps, _)| bps / 8.0)
    }

    /// Makes the hosts. From then on Ctrl-C and SIGTERM end the job (see [`interrupted`]) rather
    /// than the process, so the hosts are always removed.
    pub fn testbed(&self) -> Result<Testbed> {
        interrupted();
        Testbed::new(self.hosts, self.link.as_ref().map(|(_, l)| l.as_str()))
    }
}

/// How a bench job's connections are secured: mutual TLS with a CA made for the job (the default,
/// as `tandem launch` does), or plaintext with `--insecure` (to measure what TLS costs).
#[derive(Debug)]
pub struct JobTransport {
    /// The job's TLS folder (none in plaintext).
    dir: Option<std::path::PathBuf>,
}

impl JobTransport {
    /// Certificates for the job in a temporary folder (removed when this is dropped), or none.
    pub fn new(insecure: bool) -> Result<JobTransport> {
        if insecure {
            return Ok(JobTransport { dir: None });
        }
        let dir = std::env::temp_dir().join(format!(
            "tandem-bench-tls-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let names = ["localhost".to_string(), "127.0.0.1".to_string()];
        tandem::tls::init(&dir, None, "tandem-bench", &names, 1)?;
        Ok(JobTransport { dir: Some(dir) })
    }

    /// The variables that give a process this transport.
    pub fn env(&self) -> Vec<(String, String)> {
        match &self.dir {
            Some(d) => vec![(tandem::tls::DIR_VAR.into(), d.display().to_string())],
            None => vec![(tandem::tls::INSECURE_VAR.into(), "1".into())],
        }
    }

    /// `tls` or `plaintext`, for the report.
    pub fn name(&self) -> &'static str {
        if self.dir.is_some() {
            "mutual TLS"
        } else {
            "plaintext"
        }
    }
}

impl Drop for JobTransport {
    fn drop(&mut self) {
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Set by Ctrl-C or SIGTERM once a command has made simulated hosts: the jobs on them stop and
/// the command returns, so the hosts (namespaces, processes) are removed on the way out instead of
/// being left behind by a killed process.
pub fn interrupted() -> Arc<AtomicBool> {
    /// Made once per process: the signal watcher sets it.
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        crate::launch::watch_signals(flag.clone());
        flag
    })
    .clone()
}

/// Kills `pids` (processes started on the hosts) if a signal arrives before `done` is set.
pub fn kill_on_signal(pids: Vec<u32>, done: Arc<AtomicBool>) {
    let flag = interrupted();
    std::thread::spawn(move || {
        while !done.load(Ordering::Relaxed) {
            if flag.load(Ordering::Relaxed) {
                for pid in &pids {
                    if let Ok(p) = i32::try_from(*pid) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(p),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
}

/// A `tc` rate (`500mbit`, `2gbit`, `10gbit`, `1.5gbit`) in bits per second.
pub fn parse_rate(s: &str) -> Result<f64> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = if let Some(n) = t.strip_suffix("gbit") {
        (n, 1e9)
    } else if let Some(n) = t.strip_suffix("mbit") {
        (n, 1e6)
    } else if let Some(n) = t.strip_suffix("kbit") {
        (n, 1e3)
    } else {
        (t.as_str(), 0.0)
    };
    num.parse::<f64>()
        .ok()
        .filter(|v| mult > 0.0 && v.is_finite() && *v > 0.0 && v * mult >= 1e6)
        .map(|v| v * mult)
        .ok_or_else(|| {
            Error::invalid(
                "--link",
                format!("{s:?} is not a rate such as 500mbit, 2gbit or 10gbit (at least 1mbit)"),
            )
        })
}

/// Runs `args` of this executable as rank r on host r / R for every rank of the job, rank 0
/// hosting the rendezvous; prints rank 0's lines (and everyone's errors). Returns what failed.
pub fn run_ranks(
    bed: &Testbed,
    hosts: &Hosts,
    args: &[String],
    env: &[(String, String)],
) -> Result<String> {
    let cli = tandem_launch::cli_command();
    let (exe, words) = cli
        .split_first()
        .map_or(("tandem", &[][..]), |(p, w)| (p.as_str(), w));
    let world = hosts.hosts * hosts.per_host;
    let token = tandem::rendezvous::JobToken::generate();
    let rendezvous = format!("{}:29400", bed.addr(0));
    let mut children = Vec::new();
    for rank in 0..world {
        let args: Vec<&str> = words.iter().chain(args).map(String::as_str).collect();
        let mut c = bed.command(rank / hosts.per_host, exe, &args);
        c.env(tandem::settings::LAUNCHER.name, "tandem")
            .env(tandem::settings::RANK.name, rank.to_string())
            .env(tandem::settings::WORLD_SIZE.name, world.to_string())
            .env(
                tandem::settings::LOCAL_RANK.name,
                (rank % hosts.per_host).to_string(),
            )
            .env(
                tandem::settings::LOCAL_WORLD_SIZE.name,
                hosts.per_host.to_string(),
            )
            .env(tandem::settings::RENDEZVOUS_ADDR.name, &rendezvous)
            .env(tandem::settings::JOB_TOKEN.name, token.as_str())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match c.spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                stop(&mut children);
                return Err(Error::io(format!("starting rank {rank} on its host"), e));
            }
        }
    }
    Ok(finish(children))
}

/// Prints rank 0's output and every rank's errors while waiting for all of them (bounded);
/// returns what failed (empty when every rank succeeded).
fn finish(mut children: Vec<Child>) -> String {
    let forwards: Vec<_> = children
        .iter_mut()
        .enumerate()
        .flat_map(|(rank, c)| {
            let out = c.stdout.take().map(|o| forward(o, rank == 0));
            let err = c.stderr.take().map(|e| forward(e, true));
            out.into_iter().chain(err)
        })
        .collect();
    let failed = wait(children, Duration::from_secs(3600));
    // After a failure the processes' children may still hold the pipes until the hosts go:
    // only a clean end is waited for to the last line.
    if failed.is_empty() {
        for f in forwards {
            let _ = f.join();
        }
    }
    failed
}

/// Reads a child's output line by line on a thread of its own, printing it when `print`.
fn forward(pipe: impl std::io::Read + Send + 'static, print: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe)
            .lines()
            .map_while(std::result::Result::ok)
        {
            if print {
                println!("{line}");
            }
        }
    })
}

/// Waits for every child (bounded); stops the others at the first failure. Returns what failed.
fn wait(mut children: Vec<Child>, limit: Duration) -> String {
    let end = Instant::now() + limit;
    let stop_now = interrupted();
    let mut done = vec![false; children.len()];
    while done.iter().any(|d| !d) {
        if stop_now.load(Ordering::Relaxed) {
            stop(&mut children);
            return "interrupted by a signal".into();
        }
        for (i, c) in children.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            match c.try_wait() {
                Ok(Some(s)) if s.success() => done[i] = true,
                Ok(Some(s)) => {
                    stop(&mut children);
                    return format!("rank {i} failed ({s})");
                }
                Ok(None) => {}
                Err(e) => {
                    stop(&mut children);
                    return format!("watching rank {i}: {e}");
                }
            }
        }
        if Instant::now() >= end {
            stop(&mut children);
            return format!("the job ran past {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    String::new()
}

/// Arguments of `tandem testbed`.
#[derive(clap::Args, Debug, Clone)]
pub struct TestbedArgs {
    /// Simulated hosts.
    #[arg(long)]
    hosts: usize,
    /// Processes on each host.
    #[arg(long, default_value_t = 1)]
    ranks_per_host: usize,
    /// Shape each host's link to this rate (`2gbit`, `10gbit`).
    #[arg(long)]
    link: Option<String>,
    /// Run the command once, in host 0's network namespace only (e.g. `mpirun`, which starts the
    /// ranks itself on every host through `--agent`).
    #[arg(long)]
    once: bool,
    /// Write a remote-shell script here for `mpirun --mca plm_rsh_agent FILE` (runs a command on
    /// the host whose address it is given).
    #[arg(long)]
    agent: Option<std::path::PathBuf>,
    /// The command each process runs; `{rank}`, `{world}`, `{host}`, `{addr}` (this host's
    /// address), `{addr0}` (host 0's) and `{hosts}` (every host as `address:ranks`,
    /// comma-separated, as mpirun's `--host` takes them) are replaced.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// `tandem testbed`: runs a command once per rank on simulated hosts (to measure a peer, such as
/// Gloo or MPI, on the same links as `tandem bench --hosts`); prints rank 0's output, and every
/// rank's errors; exits non-zero when a rank failed.
pub fn testbed(a: TestbedArgs) -> Result<crate::ExitCode> {
    let hosts = Hosts::from_flags(Some(a.hosts), a.ranks_per_host, a.link.as_deref())?
        .ok_or_else(|| Error::invalid("--hosts", "is required"))?;
    let bed = hosts.testbed()?;
    if let Some(path) = &a.agent {
        bed.write_rsh_agent(path)?;
    }
    // mpirun's --host syntax: each host's address with its slots.
    let all: Vec<String> = (0..hosts.hosts)
        .map(|h| format!("{}:{}", bed.addr(h), hosts.per_host))
        .collect();
    let world = if a.once {
        1
    } else {
        hosts.hosts * hosts.per_host
    };
    let mut children = Vec::new();
    for rank in 0..world {
        let host = rank / hosts.per_host;
        let fill = |arg: &String| {
            arg.replace("{rank}", &rank.to_string())
                .replace("{world}", &world.to_string())
                .replace("{host}", &host.to_string())
                .replace("{addr0}", &bed.addr(0))
                .replace("{hosts}", &all.join(","))
                .replace("{addr}", &bed.addr(host))
        };
        let argv: Vec<String> = a.command.iter().map(fill).collect();
        let rest: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
        let mut c = if a.once {
            bed.net_command(host, &argv[0], &rest)
        } else {
            bed.command(host, &argv[0], &rest)
        };
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        match c.spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                stop(&mut children);
                return Err(Error::io(
                    format!("starting {:?} on host {host}", argv[0]),
                    e,
                ));
            }
        }
    }
    // SIGTERM or Ctrl-C: the processes on the hosts go, so this returns and the hosts are removed.
    let finished = Arc::new(AtomicBool::new(false));
    let pids = children
        .iter()
        .map(|c| {
            if a.once {
                c.id()
            } else {
                Testbed::pid_of(c).unwrap_or_else(|| c.id())
            }
        })
        .collect();
    kill_on_signal(pids, finished.clone());
    let failed = finish(children);
    finished.store(true, Ordering::Relaxed);
    if failed.is_empty() {
        Ok(crate::ExitCode::SUCCESS)
    } else {
        eprintln!("tandem testbed: {failed}");
        Ok(crate::ExitCode::from(1))
    }
}

/// Kills what is still running.
pub fn stop(children: &mut [Child]) {
    for c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_bad_ones_are_named() {
        assert_eq!(parse_rate("2gbit").ok(), Some(2e9));
        assert_eq!(parse_rate("10Gbit").ok(), Some(1e10));
        assert_eq!(parse_rate("500mbit").ok(), Some(5e8));
        assert_eq!(parse_rate("1.5gbit").ok(), Some(1.5e9));
        assert_eq!(parse_rate("1mbit").ok(), Some(1e6));
        for bad in [
            "", "2", "2gb", "fastgbit", "-1gbit", "0gbit", "999kbit", "infgbit",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert!(Hosts::from_flags(None, 1, Some("2gbit")).is_err());
        assert!(Hosts::from_flags(Some(0), 1, None).is_err());
        assert!(Hosts::from_flags(Some(65), 1, None).is_err());
        assert!(Hosts::from_flags(Some(4), 0, None).is_err());
        assert!(Hosts::from_flags(Some(4), 17, None).is_err());
        assert!(
            Hosts::from_flags(None, 1, None)
                .expect("no hosts")
                .is_none()
        );
        let h = Hosts::from_flags(Some(64), 16, Some("10gbit"))
            .expect("ok")
            .expect("hosts");
        assert_eq!(h.link_bytes_per_s(), Some(1.25e9));
    }
}
