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
