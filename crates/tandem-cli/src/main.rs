//! The `tandem` binary: the command line of [`tandem_cli::run`].

use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    ExitCode::from(tandem_cli::run(std::env::args_os()))
}
