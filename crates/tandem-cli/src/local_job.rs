//! Jobs of Tandem's own subcommands on this machine (`tandem demo`, `tandem bench`),
//! started through the launcher, plus the size parser their flags share.
//!
//! Why one runner: the demo and the benches start their ranks the way users' jobs start (the
//! launcher, a rendezvous, separate processes, certificates), so what they show and measure is what
//! a job gets.
//!
//! `parse_size` reads the size flags of every bench (`4096`, `4K`, `64M`, `1G`: powers of 1024),
//! `parse_scaled` the counts (`100K`, `10M`: powers of 1000), each naming its flag when it cannot.

use std::sync::Arc;
use std::time::Duration;

use tandem::{Error, Result};
use tandem_launch::{JobSpec, Layout, LineSink, Planned};

/// Parses a byte size such as `4096`, `4K`, `64M` or `1G` (powers of 1024).
pub fn parse_size(flag: &str, s: &str) -> Result<usize> {
    parse_scaled(flag, s, 1 << 10, "a size such as 4096, 4K, 64M or 1G")
}

/// Parses a number with an optional K, M or G suffix (multiples of `k`), positive.
pub fn parse_scaled(flag: &str, s: &str, k: usize, what: &str) -> Result<usize> {
    let t = s.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], k),
        Some('M') => (&t[..t.len() - 1], k * k),
        Some('G') => (&t[..t.len() - 1], k * k * k),
        _ => (t, 1),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| Error::invalid(flag, format!("{s:?} is not {what}")))
}

/// Runs a job of this executable's subcommands on this machine through the launcher: training
/// processes run `args`, servers (of a PS layout) `server_args`. Every output line goes to
/// `on_line`. Returns a description of the failure (empty when every process succeeded).
#[allow(clippy::too_many_arguments)]
pub fn run_local(
    layout: Layout,
    args: &[String],
    server_args: Option<&[String]>,
    env: Vec<(String, String)>,
    gpus: Vec<usize>,
    timeout: Duration,
    elastic: Option<(usize, usize)>,
    on_line: impl Fn(&Planned, &str, bool) + Send + Sync + 'static,
) -> Result<String> {
    let cli = tandem_launch::cli_command();
    let with_exe = |a: &[String]| cli.iter().chain(a).cloned().collect();
    let mut spec = JobSpec::new(layout, with_exe(args));
    spec.ps_command = server_args.map(with_exe);
    spec.env = env;
    spec.gpus = gpus;
    spec.elastic = elastic;
    spec.sink = Some(LineSink(Arc::new(on_line)));
    let outcome = tandem_launch::run(&spec, Some(timeout), &|| false)?;
    Ok(if outcome.code == 0 {
        String::new()
    } else {
        outcome.summary
    })
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
