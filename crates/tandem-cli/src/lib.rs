//! The `tandem` command, as a library: the `tandem` binary and the Python package's `tandem`
//! entry point (`python -m tandem`) both call [`run`], so every subcommand works from either.
//!
//! ```
//! // `tandem --version`, as the binary would run it (clap prints the version).
//! assert_eq!(tandem_cli::run(["tandem", "--version"]), 0);
//! // An unknown subcommand: clap's usage error, exit status 2.
//! assert_eq!(tandem_cli::run(["tandem", "no-such-command"]), 2);
//! ```
//!
//! # Layout
//! One module per subcommand (`demo`, `bench` with `bench_ps`, `bench_size` and `bench_cost`,
//! `launch`, `ps`, `certs`, `info`, `topo`, `trace`, `tune`), and what several of them share:
//! `local_job` (jobs of ranks on this machine), `hosts` (the same on simulated hosts), `plot` (PNG
//! charts) and `memory` (peak RSS).
//!
//! # Exit status
//! 0 when the command did what it was asked; 1, with `tandem: error: ...` on standard error, when it
//! could not (the message names the flag, variable or file at fault); 2 for a command line clap
//! refuses; for `tandem launch`, the job's own status (128 + the signal when a process was killed).
//! The hidden subcommands (`bench-rank`, `bench-ps-worker`, `demo-worker`) are the processes the
//! benches and the demo start; users do not call them.

mod bench;
mod bench_cost;
mod bench_ps;
mod bench_ps_worker;
mod bench_size;
mod certs;
mod demo;
mod hosts;
mod info;
mod launch;
mod local_job;
mod memory;
mod plot;
mod ps;
mod topo;
mod trace;
mod tune;

use clap::{Parser, Subcommand};
use std::ffi::OsString;

/// Tandem: distributed training with parameter servers and collectives.
#[derive(Parser, Debug)]
#[command(name = "tandem", version, about)]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// Every subcommand of `tandem`.
#[derive(Subcommand, Debug)]
enum Command {
    /// Print the cluster spec resolved from the environment (or the configuration error).
    Info(info::InfoArgs),
    /// Run a standalone rendezvous server (the job token comes from TANDEM_JOB_TOKEN).
    Rendezvous(info::RendezvousArgs),
    /// Start a job on this machine: N allreduce ranks, or parameter servers and workers.
    Launch(tandem_launch::LaunchArgs),
    /// Run the demo: train an MLP with sync PS, async PS and allreduce jobs on this machine.
    Demo(demo::DemoArgs),
    /// Run a parameter server for this process's role (TF_CONFIG, TANDEM_* or --bind).
    Ps(ps::PsArgs),
    /// Run (or resume) a hyperparameter tuning experiment written in Katib's Experiment shape.
    Tune(tune::TuneArgs),
    /// Show the GPU interconnect and the GPUs and ring order a job would get.
    Topo(topo::TopoArgs),
    /// Measure collectives (nccl-tests style table) or the parameter server.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Make a job's TLS certificate authority and certificates (`init`), or the Kubernetes
    /// Secret carrying them (`kubernetes`).
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Merge the flight-recorder dumps or timelines of a job's processes into one trace and say
    /// which rank the others waited for.
    Trace(trace::TraceArgs),
    /// Run a command once per rank on simulated hosts (network namespaces; needs root), e.g. a
    /// peer library measured on the same links as `tandem bench --hosts`.
    Testbed(hosts::TestbedArgs),
    /// One worker of `tandem bench ps`.
    #[command(hide = true)]
    BenchPsWorker(bench_ps_worker::BenchPsWorkerArgs),
    /// One rank of a benchmark (started by `tandem bench`).
    #[command(hide = true)]
    BenchRank(bench::BenchRankArgs),
    /// One worker of the demo (started by `tandem demo`).
    #[command(hide = true)]
    DemoWorker(demo::WorkerArgs),
}

/// How a command ended: the exit status of the process that ran it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitCode(u8);

impl ExitCode {
    /// The command did what it was asked.
    pub const SUCCESS: Self = Self(0);

    /// The status as a number (0 is success).
    pub fn code(self) -> u8 {
        self.0
    }
}

impl From<u8> for ExitCode {
    fn from(code: u8) -> Self {
        Self(code)
    }
}

/// Sends Tandem's `tracing` logs to stderr, filtered by `TANDEM_LOG` (default `warn`); a
/// subscriber installed already (the Python extension's, a caller's) is kept.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env(tandem::settings::LOG.name)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs the `tandem` command line `args` (the program's name first, as in `std::env::args`) and
/// returns its exit status. Errors are printed to stderr; `--help` and `--version` print to stdout
/// and return 0, a malformed command line returns 2 after clap's usage message.
pub fn run<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    init_logging();
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let code = e.exit_code();
            let _ = e.print();
            return u8::try_from(code).unwrap_or(2);
        }
    };
    let result = match cli.command {
        Command::Info(a) => info::info(a),
        Command::Rendezvous(a) => info::rendezvous(a),
        Command::Launch(a) => launch::launch(a),
        Command::Testbed(a) => hosts::testbed(a),
        Command::Demo(a) => demo::demo(a),
        Command::DemoWorker(a) => demo::worker(a),
        Command::Ps(a) => ps::ps(a),
        Command::Topo(a) => topo::topo(a),
        Command::Trace(a) => trace::trace(a),
        Command::Certs(a) => certs::certs(a),
        Command::Tune(a) => tune::tune(a),
        Command::Bench(a) => bench::run(a),
        Command::BenchPsWorker(a) => bench_ps_worker::bench_ps_worker(a),
        Command::BenchRank(a) => bench::bench_rank(a),
    };
    match result {
        Ok(code) => code.code(),
        Err(e) => {
            eprintln!("tandem: error: {e}");
            1
        }
    }
}

/// A tokio runtime for one command.
pub(crate) fn runtime() -> tandem::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| tandem::Error::io("starting the tokio runtime", e))
}
