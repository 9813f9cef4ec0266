//! Job tokens: every request of a job carries one, and the rendezvous refuses any other.
//!
//! Why a token as well as TLS: on one machine without certificates (plaintext on loopback) the
//! token is what keeps another user's job from joining; across machines it is a second factor inside
//! TLS. It is compared in constant time, and never logged.

use tandem_core::cluster::Vars;
use tandem_core::{Error, Result};
use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

/// The variable that carries a job's token.
pub const TOKEN_VAR: &str = tandem_core::settings::JOB_TOKEN.name;

/// The secret shared by every process of one job.
///
/// Its `Debug` form hides the value so it never lands in logs.
///
/// ```
/// use tandem_rendezvous::JobToken;
/// let t = JobToken::generate();
/// assert_eq!(t.as_str().len(), 32);
/// assert!(!format!("{t:?}").contains(t.as_str()));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct JobToken(String);

impl std::fmt::Debug for JobToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobToken(<hidden>)")
    }
}

impl JobToken {
    /// Wraps a token, checking it can travel in gRPC metadata (visible ASCII, 8 to 512 bytes).
    pub fn new(token: impl Into<String>) -> Result<Self> {
        let token = token.into();
        if token.len() < 8 || token.len() > 512 || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::config(
                TOKEN_VAR,
                "a job token must be 8 to 512 visible ASCII characters",
            ));
        }
        Ok(JobToken(token))
    }

    /// A fresh random token (128 bits, hex).
    pub fn generate() -> Self {
        JobToken(format!("{:032x}", rand::random::<u128>()))
    }

    /// Reads [`TOKEN_VAR`] from `vars`; `None` when it is unset.
    pub fn from_vars(vars: &(impl Vars + ?Sized)) -> Result<Option<Self>> {
        tandem_core::settings::JOB_TOKEN
            .text(vars)?
            .map(JobToken::new)
            .transpose()
    }

    /// Reads [`TOKEN_VAR`] from the process environment; `None` when it is unset.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(&tandem_core::cluster::ProcessEnv)
    }

    /// The token's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The token as the `authorization` header every call carries (`Bearer <token>`).
    pub(crate) fn header(&self) -> Result<MetadataValue<tonic::metadata::Ascii>> {
        format!("Bearer {}", self.0)
            .parse()
            .map_err(|_| Error::config(TOKEN_VAR, "the token cannot be sent as gRPC metadata"))
    }

    /// Whether `presented` is this token, compared in constant time.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let want = self.0.as_bytes();
        if presented.len() != want.len() {
            return false;
        }
        presented
            .iter()
            .zip(want)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// Server-side check: refuses requests whose `authorization` is not `Bearer <token>`.
#[derive(Clone, Debug)]
pub struct CheckToken(pub JobToken);

impl tonic::service::Interceptor for CheckToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let presented = req
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .and_then(|v| v.strip_prefix(b"Bearer "));
        match presented {
            Some(p) if self.0.matches(p) => Ok(req),
            Some(_) => {
                tracing::warn!(peer = ?req.remote_addr(), "refused a request with a wrong job token");
                Err(Status::unauthenticated("wrong job token"))
            }
            None => {
                tracing::warn!(peer = ?req.remote_addr(), "refused a request without a job token");
                Err(Status::unauthenticated("missing job token"))
            }
        }
    }
}

/// Client-side: attaches the token to every request.
#[derive(Clone, Debug)]
pub struct AttachToken(pub(crate) MetadataValue<tonic::metadata::Ascii>);

impl AttachToken {
    /// Attaches the `authorization` value `header` (`Bearer <token>`).
    pub fn from_token(header: MetadataValue<tonic::metadata::Ascii>) -> Self {
        AttachToken(header)
    }
}

impl tonic::service::Interceptor for AttachToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}
