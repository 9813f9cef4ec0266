//! The model and data `tandem demo` and Tandem's examples train: a small MLP written with `ndarray`
//! and a generated 3-class spiral that no linear model separates (no download, no setup), plus an
//! IDX (MNIST format) loader for users with real files. A crate of its own so the `tandem` command
//! (and anyone who wants a quick end-to-end check of a cluster) can depend on it from crates.io.
//!
//! ```
//! use tandem_demo::{Mlp, spiral};
//! let (x, y) = spiral(300, 7);
//! let model = Mlp::new(2, 16, 3, 1);
//! assert_eq!(x.nrows(), y.len());
//! assert!(!model.layers().is_empty());
//! ```

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
