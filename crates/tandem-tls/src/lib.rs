//! A job's public-key infrastructure: one certificate authority per job ([`Authority`]), a
//! certificate for its processes signed by it ([`Authority::issue`], the names they are reached by in
//! the subject alternative names, good for both ends of a mutual TLS connection), the files a
//! process reads them from ([`TlsFiles`]), and `tandem certs`'s folder layout ([`init`]).
//!
//! A process finds its files in `TANDEM_TLS_DIR` (`ca.pem`, `cert.pem`, `key.pem`) or in
//! `TANDEM_TLS_CA`, `TANDEM_TLS_CERT` and `TANDEM_TLS_KEY`, so certificates issued elsewhere
//! (cert-manager writes `ca.crt`, `tls.crt`, `tls.key` into a Secret: point the three variables at
//! them) work unchanged.
//!
//! ```
//! let ca = tandem_tls::Authority::generate("demo", 30)?;
//! let cert = ca.issue("rank-0", &["localhost".into(), "127.0.0.1".into()], 30)?;
//! assert!(cert.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
//! # Ok::<(), tandem_core::Error>(())
//! ```

pub mod admission;
mod authority;
mod context;
mod files;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
mod handshake;
pub mod identity;
pub mod local;
mod policy;
mod record;
pub mod stream;

pub use authority::{Authority, Issued, MAX_DAYS};
pub use context::{TlsContext, common_name, describe, peer_rank};
pub use files::{
    CA_FILE, CA_KEY_FILE, CA_VAR, CERT_FILE, CERT_VAR, DIR_VAR, KEY_FILE, KEY_VAR, Made, TlsFiles,
    init, init_as, kubernetes_secret, secret_yaml,
};
pub use policy::{INSECURE_VAR, Security, is_loopback, warn_insecure};
pub use stream::Stream;

#[cfg(test)]
mod record_tests;
#[cfg(test)]
mod tests;
