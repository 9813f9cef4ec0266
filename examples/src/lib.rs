//! The model and data Tandem's examples and `tandem demo` train: a small MLP written with `ndarray`
//! and a generated 3-class spiral that no linear model separates. No download, no setup.

pub mod model;

pub use model::{Mlp, Rng, batch, spiral};
