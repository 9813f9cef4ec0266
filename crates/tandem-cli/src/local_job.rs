//! Starting a job of local ranks: a rendezvous in this process and one child process per rank, each
//! with Tandem's variables and the job token. Shared by `tandem demo` and `tandem bench`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem::rendezvous::{EXTERNAL_VAR, Host, JobToken, ServerConfig, TOKEN_VAR};
use tandem::{Error, Result};

/// Parses a byte size such as `4096`, `4K`, `64M` or `1G` (powers of 1024).
pub fn parse_size(flag: &str, s: &str) -> Result<usize> {
    let t = s.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1usize << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            Error::invalid(
                flag,
                format!("{s:?} is not a size such as 4096, 4K, 64M or 1G"),
            )
        })
}

/// A running local job.
pub struct LocalJob {
    rt: tokio::runtime::Runtime,
    host: Host,
    children: Vec<Child>,
    forwarders: Vec<std::thread::JoinHandle<()>>,
}

impl LocalJob {
    /// Hosts a rendezvous on an ephemeral loopback port and starts `np` ranks of this executable with
    /// `args`; every stdout line of rank r goes to `on_line(r, line)`.
    pub fn start(
        np: usize,
        args: &[String],
        env: &[(String, String)],
        on_line: impl Fn(usize, &str) + Send + Sync + 'static,
    ) -> Result<LocalJob> {
        let rt = crate::runtime()?;
        let token = JobToken::generate();
        let host = rt.block_on(Host::bind("127.0.0.1:0", ServerConfig::new(token.clone())))?;
        let exe =
            std::env::current_exe().map_err(|e| Error::io("finding the tandem executable", e))?;
        let on_line = Arc::new(on_line);
        let mut children = Vec::new();
        let mut forwarders = Vec::new();
        for rank in 0..np {
            let mut cmd = Command::new(&exe);
            cmd.args(args)
                .env("TANDEM_LAUNCHER", "tandem")
                .env("TANDEM_RANK", rank.to_string())
                .env("TANDEM_WORLD_SIZE", np.to_string())
                .env("TANDEM_LOCAL_RANK", rank.to_string())
                .env("TANDEM_LOCAL_WORLD_SIZE", np.to_string())
                .env("TANDEM_RENDEZVOUS_ADDR", host.addr().to_string())
                .env(EXTERNAL_VAR, "1")
                .env(TOKEN_VAR, token.as_str())
                .stdout(Stdio::piped());
            for (k, v) in env {
                cmd.env(k, v);
            }
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    for c in &mut children {
                        stop(c);
                    }
                    return Err(Error::io(format!("starting rank {rank}"), e));
                }
            };
            if let Some(out) = child.stdout.take() {
                let f = on_line.clone();
                forwarders.push(std::thread::spawn(move || {
                    for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
                        f(rank, &line);
                    }
                }));
            }
            children.push(child);
        }
        Ok(LocalJob {
            rt,
            host,
            children,
            forwarders,
        })
    }

    /// Waits for every rank; when one fails the others are stopped. Returns a description of each
    /// failed rank (empty when all succeeded). Ranks still running after `timeout` are killed.
    pub fn wait(mut self, timeout: Duration) -> Result<Vec<String>> {
        let end = Instant::now() + timeout;
        let mut status: Vec<Option<String>> = vec![None; self.children.len()];
        while status.iter().any(Option::is_none) {
            let mut any_failed = false;
            for (rank, child) in self.children.iter_mut().enumerate() {
                if status[rank].is_none()
                    && let Ok(Some(s)) = child.try_wait()
                {
                    any_failed |= !s.success();
                    status[rank] = Some(if s.success() {
                        String::new()
                    } else {
                        format!("rank {rank} ({s})")
                    });
                }
            }
            let expired = Instant::now() >= end;
            if any_failed || expired {
                for (rank, child) in self.children.iter_mut().enumerate() {
                    if status[rank].is_none() {
                        stop(child);
                        let why = if expired {
                            format!("killed after {timeout:?}")
                        } else {
                            "stopped after another rank failed".into()
                        };
                        status[rank] = Some(format!("rank {rank} ({why})"));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for f in self.forwarders.drain(..) {
            let _ = f.join();
        }
        self.rt.block_on(self.host.stop())?;
        Ok(status
            .into_iter()
            .flatten()
            .filter(|s| !s.is_empty())
            .collect())
    }
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("x", "4K").unwrap(), 4096);
        assert_eq!(parse_size("x", "64m").unwrap(), 64 << 20);
        assert_eq!(parse_size("x", "123").unwrap(), 123);
        for bad in ["", "K", "0", "4X", "-1M", "99999999999999999G"] {
            assert!(parse_size("--min", bad).is_err(), "{bad}");
        }
    }
}
