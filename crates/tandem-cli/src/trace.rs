//! `tandem trace DIR`: merges the flight-recorder dumps and timelines of every process of a job into
//! one Chrome trace and prints who waited for whom.
//!
//! Why merge: a hang leaves every process with a flight-recorder dump (and, with a timeline,
//! its operations over time), but the culprit shows only side by side: the rank whose last
//! collective differs, who waited for whom, who arrived late, which calls did not match.
//!
//! Where the files come from: every process dumps its flight recorder on a timeout, an abort, an
//! error and `SIGUSR1` (`TANDEM_TRACE_DIR`, by default `trace/` in the launch's log folder), and
//! writes a timeline with `TANDEM_TIMELINE=DIR`. `tandem trace DIR` reads every file of the folder,
//! writes the merged Chrome trace (`DIR/merged-trace.json` unless `--out` says; open it in
//! Perfetto or `chrome://tracing`), and prints the diagnosis: each rank's last collective, who
//! waited for whom and the verdict, the late-arrival table, and any calls the ranks disagree on.

use crate::ExitCode;
use std::path::PathBuf;

use tandem::{Error, Result};

/// Arguments of `tandem trace`.
#[derive(clap::Args, Debug)]
pub struct TraceArgs {
    /// The folder of the dumps (`TANDEM_TRACE_DIR`; `trace/` in the launch's log folder) or
    /// timelines (`TANDEM_TIMELINE`).
    pub dir: PathBuf,
    /// Where to write the merged trace (default: DIR/merged-trace.json); load it in
    /// ui.perfetto.dev or chrome://tracing.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

/// Reads, merges, writes and diagnoses.
pub fn trace(args: TraceArgs) -> Result<ExitCode> {
    let tracks = tandem::observe::analyze::load(&args.dir)
        .map_err(|m| Error::invalid("DIR", m.to_string()))?;
    let merged = tandem::observe::analyze::merge(&tracks);
    let out = args
        .out
        .unwrap_or_else(|| args.dir.join("merged-trace.json"));
    let text = serde_json::to_vec(&merged)
        .map_err(|e| Error::invalid("trace", format!("could not encode the merged trace: {e}")))?;
    std::fs::write(&out, text).map_err(|e| Error::io(format!("writing {}", out.display()), e))?;
    print!("{}", tandem::observe::analyze::diagnose(&tracks));
    println!(
        "\nmerged trace: {} (open in ui.perfetto.dev or chrome://tracing)",
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}
