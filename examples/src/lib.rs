//! The model and data Tandem's examples and `tandem demo` train: a small MLP written with `ndarray`
//! and a generated 3-class spiral that no linear model separates (no download, no setup), plus an
//! IDX (MNIST format) loader for users with real files.

pub mod idx;
pub mod model;

pub use model::{Mlp, Rng, accuracy_of, batch, spiral};

use tandem::ps::init::Init;
use tandem::ps::placement::ParamDecl;

/// The parameter-server declarations of `model`'s layers, initialised on the servers from `seed`.
pub fn ps_params(model: &Mlp, seed: u64) -> Vec<ParamDecl> {
    model
        .layers()
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape, std))| {
            let init = if std > 0.0 {
                Init::Normal {
                    mean: 0.0,
                    std,
                    seed: seed + i as u64,
                }
            } else {
                Init::Zeros
            };
            ParamDecl::new(name, &shape, init)
        })
        .collect()
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
