//! The `tandem` binary: the command line of [`tandem_cli::run`].

use std::process::ExitCode;

/// mimalloc for every allocation of the CLI's processes (servers and workers allocate and free
/// large gradient and snapshot buffers every step; see BENCHMARKS.md on its purge delay).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `tandem`: see [`tandem_cli::run`].
fn main() -> ExitCode {
    ExitCode::from(tandem_cli::run(std::env::args_os()))
}
