//! `tandem launch`: start a job on this machine with the environment a cluster would inject.
//!
//! Why: the same programs run under Kubernetes, Slurm or mpirun by reading the environment those
//! inject. `tandem launch` injects that environment on one machine (TF_CONFIG for `--ps/--workers`
//! jobs, RANK, WORLD_SIZE and MASTER_ADDR/PORT for `--nproc`), hosts the job's rendezvous, makes its
//! CA and certificates, restarts failed processes as asked, and stops them all on Ctrl-C. The
//! supervision itself lives in tandem-launch; this module maps the command line onto it.

use crate::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tandem::Result;
use tandem_launch::LaunchArgs;

/// Runs the job; exits with the failed process's code (130 on Ctrl-C).
pub fn launch(args: LaunchArgs) -> Result<ExitCode> {
    // A leading `tandem` in the command or `--ps-cmd` runs this very CLI (`to_spec`).
    let spec = args.to_spec()?;
    let stop = Arc::new(AtomicBool::new(false));
    watch_signals(stop.clone());
    let outcome = tandem_launch::run(&spec, args.deadline(), &|| stop.load(Ordering::Relaxed))?;
    eprintln!("tandem launch: {}", outcome.summary);
    if let Some(dir) = &outcome.log_dir {
        eprintln!("tandem launch: logs in {}", dir.display());
    }
    Ok(ExitCode::from(u8::try_from(outcome.code).unwrap_or(1)))
}

/// Sets `stop` on SIGINT or SIGTERM (the launcher then stops every child and exits).
pub(crate) fn watch_signals(stop: Arc<AtomicBool>) {
    let started = std::thread::Builder::new()
        .name("tandem-signals".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                stop.store(true, Ordering::Relaxed);
            });
        });
    if let Err(e) = started {
        tracing::warn!("cannot watch for Ctrl-C ({e}); stop the job's processes by hand");
    }
}
