//! A process's TLS identity made usable: its certificate and key, the job's CA, and the rustls
//! configurations of both ends of a mutual TLS connection built from them.
//!
//! How a peer is authenticated: by its certificate chaining to the job's CA (each job has its own
//! CA, so a certificate it signed is a member of the job and nothing else is), with the client's
//! certificate required by every server. Host names are not checked: ring peers are dialled at
//! addresses learnt at run time (a pod's IP) that no certificate issued before the job can list.
//! Where a certificate names a rank (common name `rank-<n>`), the ring handshake checks the rank a
//! peer claims against it ([`peer_rank`]).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tandem_core::{Error, Result};

use crate::files::TlsFiles;

/// Everything a process needs to open and accept mutual TLS connections within its job.
#[derive(Clone)]
pub struct TlsContext {
    /// For gRPC servers.
    server: Arc<rustls::ServerConfig>,
    /// For gRPC clients.
    client: Arc<rustls::ClientConfig>,
    /// The same, handing the negotiated keys over to [`crate::record`].
    stream_server: Arc<rustls::ServerConfig>,
    /// For the ring's dialling side.
    stream_client: Arc<rustls::ClientConfig>,
    /// The certificate's common name.
    name: String,
    /// Who this process is in its job, when its certificate says.
    identity: Option<crate::identity::Identity>,
}

impl std::fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContext")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// ring, with AES-128-GCM first: a tenth of an allreduce's CPU on a fast link goes to AES, and
/// 128-bit keys take 10 rounds where 256-bit take 14 (BENCHMARKS.md, "TLS").
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// A bad TLS file: `what` it is meant to be, where it came from, and what is wrong.
fn bad(what: &str, source: &str, problem: impl std::fmt::Display) -> Error {
    Error::invalid(what.to_string(), format!("{source}: {problem}"))
}

/// The common name in a certificate's subject, if it has one.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// The rank a certificate is bound to: its common name is `rank-<n>`.
pub fn peer_rank(der: &[u8]) -> Option<usize> {
    common_name(der)?.strip_prefix("rank-")?.parse().ok()
}

/// The CA certificates of `pem` (at least one).
fn roots(pem: &[u8], source: &str) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem) {
        let c = c.map_err(|e| bad("TLS CA", source, e))?;
        roots
            .add(c)
            .map_err(|e| bad("TLS CA", source, format!("not a CA certificate ({e})")))?;
    }
    if roots.is_empty() {
        return Err(bad("TLS CA", source, "holds no PEM certificate"));
    }
    Ok(roots)
}

/// The certificate chain of `pem`, leaf first (at least the leaf).
fn chain(pem: &[u8], source: &str) -> Result<Vec<CertificateDer<'static>>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad("TLS certificate", source, e))?;
    if chain.is_empty() {
        return Err(bad("TLS certificate", source, "holds no PEM certificate"));
    }
    Ok(chain)
}

impl TlsContext {
    /// Reads the files and builds both configurations; every problem names the file.
    pub fn load(files: &TlsFiles) -> Result<TlsContext> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| Error::io(format!("reading {}", p.display()), e))
        };
        Self::from_pem(
            &read(&files.ca)?,
            &read(&files.cert)?,
            &read(&files.key)?,
            [
                files.ca.display().to_string(),
                files.cert.display().to_string(),
                files.key.display().to_string(),
            ],
        )
    }

    /// Builds both configurations from PEM texts; `sources` names them (CA, certificate, key) in
    /// errors.
    pub fn from_pem(
        ca: &[u8],
        cert: &[u8],
        key: &[u8],
        sources: [String; 3],
    ) -> Result<TlsContext> {
        let [ca_src, cert_src, key_src] = sources;
        let roots = roots(ca, &ca_src)?;
        let chain = chain(cert, &cert_src)?;
        let leaf = &chain[0];
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad("TLS key", &key_src, e))?;
        let provider = provider();
        let roots = Arc::new(roots);
        let verifier = JobServerVerifier {
            roots: roots.clone(),
            algs: provider.signature_verification_algorithms,
        };
        let identity = crate::identity::Identity::of_certificate(leaf);
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| bad("TLS CA", &ca_src, e))?;
        // This process's own certificate must be one its peers accept: checked now, so a wrong or
        // expired file fails at start and names itself, not at the first connection. A role that
        // only dials holds a certificate for client use alone.
        let own = match &identity {
            Some(id) if !id.role.serves() => client_verifier
                .verify_client_cert(leaf, &chain[1..], UnixTime::now())
                .map(|_| ()),
            _ => verifier.verify_chain(leaf, &chain[1..], UnixTime::now()),
        };
        own.map_err(|e| {
            bad(
                "TLS certificate",
                &cert_src,
                format!("not valid under the CA in {ca_src}: {}", describe(&e)),
            )
        })?;
        let name = common_name(leaf).unwrap_or_else(|| "(no common name)".into());
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad("TLS", "protocol versions", e))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| bad("TLS key", &key_src, format!("does not fit {cert_src}: {e}")))?;
        // Connections live as long as the job: no resumption, so no tickets to send.
        server.send_tls13_tickets = 0;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad("TLS", "protocol versions", e))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(chain, key)
            .map_err(|e| bad("TLS key", &key_src, format!("does not fit {cert_src}: {e}")))?;
        // The ring's connections protect their records themselves with the keys rustls
        // negotiated (see `record`), so rustls must hand them over; gRPC's configs keep them.
        let mut stream_server = server.clone();
        stream_server.enable_secret_extraction = true;
        let mut stream_client = client.clone();
        stream_client.enable_secret_extraction = true;
        Ok(TlsContext {
            server: Arc::new(server),
            client: Arc::new(client),
            stream_server: Arc::new(stream_server),
            stream_client: Arc::new(stream_client),
            name,
            identity,
        })
    }

    /// Who this process is in its job, when its certificate names it (see [`crate::identity`]).
    pub fn identity(&self) -> Option<&crate::identity::Identity> {
        self.identity.as_ref()
    }

    /// The configuration of the accepting end (client certificates required).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }

    /// The configuration of the connecting end (presents this process's certificate).
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client.clone()
    }

    /// The accepting end's configuration for the ring's connections (keys handed over).
    pub(crate) fn stream_server_config(&self) -> Arc<rustls::ServerConfig> {
        self.stream_server.clone()
    }

    /// The connecting end's configuration for the ring's connections (keys handed over).
    pub(crate) fn stream_client_config(&self) -> Arc<rustls::ClientConfig> {
        self.stream_client.clone()
    }

    /// This process's certificate's common name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Accepts a server whose certificate chains to the job's CA and is valid now, whatever names it
/// lists (see the module's doc for why names are not checked).
#[derive(Debug)]
struct JobServerVerifier {
    /// The job's CA.
    roots: Arc<RootCertStore>,
    /// The signature algorithms accepted.
    algs: WebPkiSupportedAlgorithms,
}

impl JobServerVerifier {
    /// Checks a server's certificate chain against the job's CA (names are not checked: peers are
    /// named by their certificates' job identities, see [`crate::identity`]).
    fn verify_chain(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<(), rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(leaf)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )
    }
}

impl ServerCertVerifier for JobServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.verify_chain(end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A TLS failure in words a user acts on.
pub fn describe(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            "the certificate is not signed by this job's CA (a certificate from another job, or a wrong TANDEM_TLS_CA?)".into()
        }
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the certificate has expired (issue new ones with `tandem certs init`)".into()
        }
        E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "the certificate is not valid yet (are the hosts' clocks apart?)".into()
        }
        E::InvalidCertificate(C::InvalidPurpose | C::InvalidPurposeContext { .. }) => {
            "the certificate is not issued for this use: its role may not serve (or dial) here, \
             e.g. a worker's certificate on a parameter server"
                .into()
        }
        E::InvalidCertificate(other) => format!("the certificate is invalid ({other:?})"),
        E::NoCertificatesPresented => "the peer presented no certificate".into(),
        E::AlertReceived(A::CertificateRequired) => {
            "the peer required this process's certificate and got none".into()
        }
        E::AlertReceived(A::UnknownCA | A::BadCertificate | A::CertificateUnknown) => {
            "the peer refused this process's certificate (not signed by the peer's job CA: a certificate from another job?)".into()
        }
        E::AlertReceived(A::CertificateExpired) => {
            "the peer found this process's certificate expired".into()
        }
        other => other.to_string(),
    }
}
