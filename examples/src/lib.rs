//! Helpers of Tandem's runnable examples; the model and data they train come from `tandem-demo`.

pub use tandem_demo::{Mlp, Rng, accuracy_of, batch, idx, model, ps_params, spiral};

use std::process::ExitCode;

/// The exit of an example's `main`: on an error, its message (not its debug form) on stderr and
/// exit code 1, as a user of a command expects.
pub fn report(result: tandem::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The `main` of a program that runs as every replica of a parameter-server job: a parameter
/// server serves ([`serve_if_parameter_server`]), a worker runs `worker`; either way an error is
/// reported as [`report`] does.
pub fn ps_main(worker: fn() -> tandem::Result<()>) -> ExitCode {
    report(serve_if_parameter_server().and_then(|served| if served { Ok(()) } else { worker() }))
}

/// The value of `--name VALUE` on the command line, or `default`.
pub fn flag<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .find(|w| w[0] == name)
        .and_then(|w| w[1].parse().ok())
        .unwrap_or(default)
}

/// When this process is a parameter server of its job (`TF_CONFIG` task type `ps`), serves until
/// every worker is done and returns `true`; otherwise returns `false` at once. This is how one
/// program runs as every replica of a TFJob.
pub fn serve_if_parameter_server() -> tandem::Result<bool> {
    use tandem::cluster::{ClusterSpec, Role};
    use tandem::rendezvous::{JobToken, TOKEN_VAR};
    let spec = ClusterSpec::from_env()?;
    if spec.role() != Role::Ps {
        return Ok(false);
    }
    let addr = spec
        .peer(Role::Ps, spec.index())
        .ok_or_else(|| tandem::Error::config("TF_CONFIG", "no address for this server"))?
        .to_string();
    let token =
        JobToken::from_env()?.ok_or_else(|| tandem::Error::config(TOKEN_VAR, "is not set"))?;
    let rt = tokio::runtime::Runtime::new()
        .map_err(|e| tandem::Error::io("starting the server runtime", e))?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| tandem::Error::io(format!("binding {addr}"), e))?;
        let config = tandem::ps::server::ServerConfig::new(token);
        tandem::ps::server::run(listener, config, tandem::rendezvous::shutdown_signal()).await
    })?;
    Ok(true)
}

/// A worker of the parameter-server examples, connected: its job (from `TF_CONFIG` or
/// `tandem launch`), a model whose layout the servers learn from it (they initialise the
/// weights), and a client that declared that layout placed on the job's servers. `mode` gets
/// the job's number of workers.
pub fn ps_worker(
    optimizer: tandem::ps::optimizer::Optimizer,
    mode: impl FnOnce(u32) -> tandem::ps::client::TrainingMode,
) -> tandem::Result<(
    tandem::ps::job::PsJob,
    Mlp,
    tandem::ps::blocking::BlockingClient,
)> {
    use tandem::rendezvous::{JobToken, TOKEN_VAR};
    let job = tandem::ps::job::PsJob::from_env()?;
    let token =
        JobToken::from_env()?.ok_or_else(|| tandem::Error::config(TOKEN_VAR, "is not set"))?;
    let model = Mlp::new(2, 64, 3, 0);
    let map = tandem::ps::placement::place(&ps_params(&model, 7), job.servers.len(), 1 << 10)?;
    let client = tandem::ps::blocking::BlockingClient::connect(
        &job.servers,
        &token,
        job.worker,
        map,
        optimizer,
        mode(job.workers),
        std::time::Duration::from_secs(60),
    )?;
    Ok((job, model, client))
}
