//! The shared vocabulary of Tandem: errors, dtypes and reduce operators, host tensors, and the cluster
//! spec discovered from the environment a launcher injects.
//!
//! # Layout
//! - [`error`]: [`Error`], the one error type of every Tandem crate.
//! - [`dtype`]: [`DType`], the [`Element`] trait and [`ReduceOp`].
//! - [`tensor`]: [`Tensor`] and [`TensorMut`], `bytes` buffers with zero-copy `ndarray` views.
//! - [`blocking`]: [`blocking_twins!`], the methods of a blocking client over an async one.
//! - [`compression`]: the compression settings of gradient transfers and their casts.
//! - [`vars`]: where variables are read from (the process environment, or a fixture in tests).
//! - [`settings`]: every `TANDEM_*` variable, declared once and read by one routine.
//! - [`cluster`]: [`ClusterSpec`], resolved from TF_CONFIG, torchrun, Slurm, Open MPI, PMI or
//!   Tandem's own variables.
//!
//! This crate does no I/O beyond reading variables: no tokio, no tonic, no Python.
//!
//! # Feature Flags
//! None.

pub mod backoff;
pub mod blocking;
pub mod cluster;
pub mod compression;
pub mod dtype;
pub mod error;
pub mod settings;
pub mod tensor;
pub mod vars;

pub use backoff::Backoff;
pub use cluster::{ClusterSpec, Convention, Role};
pub use dtype::{DType, Element, ReduceOp};
pub use error::{Error, Result};
pub use tensor::{Tensor, TensorMut};

/// Re-exported so users name the same half-precision types Tandem uses.
pub use half;
