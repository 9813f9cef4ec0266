//! The command line of `tandem launch` (shared by the `tandem` binary and `python -m tandem.launch`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use tandem_core::{Error, Result};

use crate::plan::{JobSpec, Layout, Restart};

/// When failed processes are restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RestartArg {
    /// A failure ends the job.
    Never,
    /// Restart a failed process up to `--max-restarts` times.
    OnFailure,
}

/// Arguments of `tandem launch`.
///
/// ```
/// use clap::Parser;
/// #[derive(Parser)]
/// struct Cli { #[command(flatten)] launch: tandem_launch::LaunchArgs }
/// let cli = Cli::parse_from(["launch", "--ps", "2", "--workers", "4", "--", "python", "train.py"]);
/// let spec = cli.launch.to_spec().unwrap();
/// assert_eq!(spec.command, ["python", "train.py"]);
/// ```
#[derive(Args, Debug, Clone)]
pub struct LaunchArgs {
    /// Start N ranks of an allreduce job (RANK, WORLD_SIZE, MASTER_ADDR/PORT as a PyTorchJob sets them).
    #[arg(long, conflicts_with_all = ["ps", "workers", "chief"])]
    pub nproc: Option<usize>,
    /// Start P parameter servers (a TFJob's PS replicas; every process gets a TF_CONFIG).
    #[arg(long, requires = "workers")]
    pub ps: Option<usize>,
    /// Start W workers of a parameter-server job.
    #[arg(long, requires = "ps")]
    pub workers: Option<usize>,
    /// Make worker 0 a separate `chief` replica, as a TFJob with a Chief does.
    #[arg(long)]
    pub chief: bool,
    /// Command the parameter servers run instead of CMD (split on spaces), e.g. "tandem ps".
    #[arg(long, value_name = "CMD")]
    pub ps_cmd: Option<String>,
    /// The servers' command when `--ps-cmd` is not given (set by `python -m tandem.launch`:
    /// Python's parameter server); without it the servers run CMD, TensorFlow style.
    #[arg(long, value_name = "CMD", hide = true)]
    pub default_ps_cmd: Option<String>,
    /// Folder under which each job writes one log file per process.
    #[arg(long, default_value = "tandem-logs")]
    pub log_dir: PathBuf,
    /// Serve every process's Prometheus metrics from this host:port on (process i of a host at
    /// port + i): sets TANDEM_METRICS_ADDR for them.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
    /// Write no log files.
    #[arg(long)]
    pub no_log_files: bool,
    /// Do not prefix output lines with the process's role and index.
    #[arg(long)]
    pub no_prefix: bool,
    /// Restart policy for failed processes.
    #[arg(long, value_enum, default_value_t = RestartArg::Never)]
    pub restart: RestartArg,
    /// Restarts allowed per process with `--restart on-failure`.
    #[arg(long, default_value_t = 3)]
    pub max_restarts: u32,
    /// An elastic allreduce job of MIN to MAX ranks (default MAX: --nproc): a rank that fails does
    /// not end the job while MIN remain (with `--restart on-failure` a replacement starts and joins;
    /// a rank out of restarts is retired). The ranks use tandem's elastic API.
    #[arg(long, value_name = "MIN[:MAX]")]
    pub elastic: Option<String>,
    /// Stop the job after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// GPUs for the training processes: `auto` (choose from `nvidia-smi topo -m`, fastest ring
    /// first; nothing when there are no GPUs), `none`, or a list in ring order such as `0,2`.
    #[arg(long, default_value = "auto")]
    pub gpus: String,
    /// Extra variable for every process (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// The program every training process runs, and its arguments (after `--`, or everything from
    /// the first word that is not an option). A leading `tandem` runs this Tandem's command line; a
    /// leading `script.py` runs with Python (`TANDEM_PYTHON`, else `python3`).
    #[arg(trailing_var_arg = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

impl LaunchArgs {
    /// The job these arguments describe.
    pub fn to_spec(&self) -> Result<JobSpec> {
        let layout = match (self.nproc, self.ps, self.workers) {
            (Some(nproc), None, None) => Layout::Allreduce { nproc },
            (None, Some(ps), Some(workers)) => Layout::Ps {
                ps,
                workers,
                chief: self.chief,
            },
            _ => {
                return Err(Error::invalid(
                    "tandem launch",
                    "give either --nproc N (allreduce job) or --ps P --workers W (parameter-server job)",
                ));
            }
        };
        let mut spec = JobSpec::new(layout, crate::resolve_command(self.command.clone()));
        spec.ps_command = self
            .ps_cmd
            .as_ref()
            .or(self.default_ps_cmd.as_ref().filter(|_| self.ps.is_some()))
            .map(|c| crate::resolve_command(c.split_whitespace().map(str::to_string).collect()));
        spec.log_dir = (!self.no_log_files).then(|| self.log_dir.clone());
        spec.prefix = !self.no_prefix;
        if let Some(addr) = &self.metrics_addr {
            spec.env.push((
                tandem_core::settings::METRICS_ADDR.name.to_string(),
                addr.clone(),
            ));
        }
        spec.restart = match self.restart {
            RestartArg::Never => Restart::Never,
            RestartArg::OnFailure => Restart::OnFailure {
                max: self.max_restarts,
            },
        };
        for kv in &self.env {
            let (k, v) = kv
                .split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| Error::invalid("--env", format!("{kv:?} is not KEY=VALUE")))?;
            spec.env.push((k.to_string(), v.to_string()));
        }
        if let Some(e) = &self.elastic {
            let nproc = self.nproc.unwrap_or(0);
            let num = |t: &str| {
                t.trim().parse::<usize>().map_err(|_| {
                    Error::invalid("--elastic", format!("{e:?}: give MIN or MIN:MAX (numbers)"))
                })
            };
            spec.elastic = Some(match e.split_once(':') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => (num(e)?, nproc),
            });
        }
        spec.gpus = crate::gpus::assign(&self.gpus, &spec.layout)?;
        spec.validate()?;
        Ok(spec)
    }

    /// The job's deadline, if one was given.
    pub fn deadline(&self) -> Option<Duration> {
        self.timeout.map(Duration::from_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        launch: LaunchArgs,
    }

    fn parse(args: &[&str]) -> std::result::Result<Result<JobSpec>, clap::Error> {
        Cli::try_parse_from(std::iter::once("launch").chain(args.iter().copied()))
            .map(|c| c.launch.to_spec())
    }

    #[test]
    fn the_command_follows_the_options_with_or_without_a_separator() {
        let s = parse(&["--nproc", "2", "--elastic", "1:2", "train.py", "--lr", "1"])
            .unwrap()
            .unwrap();
        // A bare script runs with Python; its own options stay its own.
        assert_eq!(s.command.len(), 4, "{:?}", s.command);
        assert_eq!(s.command[1..], ["train.py", "--lr", "1"]);
        assert_eq!(s.elastic, Some((1, 2)));
        let s = parse(&["--nproc", "2", "--", "./run", "--nproc", "9"])
            .unwrap()
            .unwrap();
        assert_eq!(s.command, ["./run", "--nproc", "9"]);
        let s = parse(&["--nproc", "1", "./run.pyc"]).unwrap().unwrap();
        assert_eq!(s.command, ["./run.pyc"]);
        assert!(parse(&["--nproc", "2"]).is_err(), "a job needs a command");
    }

    #[test]
    fn servers_run_the_default_command_only_when_none_is_given() {
        let servers = |args: &[&str]| parse(args).unwrap().unwrap().ps_command;
        let dflt = ["--default-ps-cmd", "./py -m tandem.ps"];
        let ps = ["--ps", "1", "--workers", "1"];
        assert_eq!(
            servers(&[&dflt[..], &ps[..], &["./t"]].concat()),
            Some(vec!["./py".into(), "-m".into(), "tandem.ps".into()])
        );
        assert_eq!(
            servers(&[&dflt[..], &ps[..], &["--ps-cmd", "./srv x", "./t"]].concat()),
            Some(vec!["./srv".into(), "x".into()])
        );
        assert_eq!(
            servers(&[&dflt[..], &["--nproc", "1", "./t"]].concat()),
            None
        );
        assert_eq!(servers(&[&ps[..], &["./t"]].concat()), None);
    }

    #[test]
    fn elastic_bounds_are_checked_against_the_job() {
        let e = |bounds: &str, n: &str| {
            parse(&["--nproc", n, "--elastic", bounds, "--", "x"])
                .unwrap()
                .map(|s| s.elastic)
                .map_err(|e| e.to_string())
        };
        assert_eq!(e("2:4", "3"), Ok(Some((2, 4))));
        assert_eq!(e("3:3", "3"), Ok(Some((3, 3))));
        assert_eq!(e("1", "3"), Ok(Some((1, 3))));
        for (bad, n) in [
            ("0:3", "3"),
            ("4:5", "3"),
            ("2:2", "3"),
            ("x", "3"),
            ("2:y", "3"),
        ] {
            let err = e(bad, n).unwrap_err();
            assert!(err.contains("--elastic"), "{bad}: {err}");
        }
        let ps = parse(&["--ps", "1", "--workers", "2", "--elastic", "1:2", "--", "x"]).unwrap();
        assert!(ps.unwrap_err().to_string().contains("allreduce jobs"));
        // The processes learn the bounds.
        let s = parse(&["--nproc", "2", "--elastic", "1:4", "--", "x"])
            .unwrap()
            .unwrap();
        let planned = crate::plan(&s, "127.0.0.1:1", &[]).unwrap();
        assert!(
            planned[0]
                .env
                .contains(&("TANDEM_ELASTIC".to_string(), "1:4".to_string()))
        );
    }

    #[test]
    fn both_shapes_parse() {
        let s = parse(&["--nproc", "4", "--", "python", "t.py", "--lr", "0.1"])
            .unwrap()
            .unwrap();
        assert_eq!(s.layout, Layout::Allreduce { nproc: 4 });
        assert_eq!(s.command, ["python", "t.py", "--lr", "0.1"]);
        let s = parse(&[
            "--ps",
            "2",
            "--workers",
            "3",
            "--chief",
            "--ps-cmd",
            "tandem ps --log-every 5",
            "--restart",
            "on-failure",
            "--max-restarts",
            "2",
            "--env",
            "A=b=c",
            "--",
            "x",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            s.layout,
            Layout::Ps {
                ps: 2,
                workers: 3,
                chief: true
            }
        );
        assert_eq!(s.ps_command.unwrap(), ["tandem", "ps", "--log-every", "5"]);
        assert_eq!(s.restart, Restart::OnFailure { max: 2 });
        assert_eq!(s.env, [("A".to_string(), "b=c".to_string())]);
    }

    #[test]
    fn bad_command_lines_are_refused() {
        assert!(parse(&["--nproc", "2"]).is_err(), "no command");
        assert!(parse(&["--nproc", "2", "--ps", "1", "--", "x"]).is_err());
        assert!(
            parse(&["--ps", "1", "--", "x"]).is_err(),
            "--ps needs --workers"
        );
        let e = parse(&["--", "x"]).unwrap().unwrap_err();
        assert!(e.to_string().contains("--nproc"));
        let e = parse(&["--nproc", "2", "--env", "novalue", "--", "x"])
            .unwrap()
            .unwrap_err();
        assert!(e.to_string().contains("--env"));
    }
}
