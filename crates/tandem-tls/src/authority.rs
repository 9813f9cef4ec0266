//! The job's certificate authority and the certificates it signs.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tandem_core::{Error, Result};
use time::{Duration, OffsetDateTime};

/// The longest validity [`Authority::generate`] and [`Authority::issue`] accept, in days (ten
/// years): certificates are per job.
pub const MAX_DAYS: u32 = 3650;

/// A job's certificate authority: its certificate (shared with every process) and its key (kept
/// by whoever issues certificates).
pub struct Authority {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The CA's private key, PEM.
    pub key_pem: String,
    /// The CA's certificate and key, as rcgen signs with them.
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

/// A certificate-making failure as an invalid-argument error naming `what`.
fn tls_error(what: &str, e: rcgen::Error) -> Error {
    Error::invalid(what, e.to_string())
}

/// From an hour ago (clocks of a job's hosts differ a little) for `days` days.
fn validity(days: u32, what: &str) -> Result<(OffsetDateTime, OffsetDateTime)> {
    if days == 0 || days > MAX_DAYS {
        return Err(Error::invalid(
            what,
            format!("{days} days of validity: give 1 to {MAX_DAYS}"),
        ));
    }
    let now = OffsetDateTime::now_utc();
    Ok((
        now - Duration::hours(1),
        now + Duration::days(i64::from(days)),
    ))
}

/// Whether `n` is an IP address, a DNS name (labels of letters, digits and '-'), or a `*.` wildcard
/// over one.
fn host_name(n: &str) -> bool {
    if n.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let name = n.strip_prefix("*.").unwrap_or(n);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

impl Authority {
    /// A new authority for job `job`, valid `days` days.
    pub fn generate(job: &str, days: u32) -> Result<Authority> {
        if job.is_empty() {
            return Err(Error::invalid(
                "job",
                "a job needs a name for its authority",
            ));
        }
        let (from, until) = validity(days, "CA validity")?;
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| tls_error("CA parameters", e))?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Tandem job {job} CA"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Tandem");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = from;
        params.not_after = until;
        let key = KeyPair::generate().map_err(|e| tls_error("CA key", e))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| tls_error("CA certificate", e))?;
        Ok(Authority {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The job a CA made by [`Authority::generate`] was made for (its common name is
    /// `Tandem job <job> CA`); `None` for another CA.
    pub fn job(&self) -> Option<String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).ok()?;
        let cn = crate::common_name(&der)?;
        Some(
            cn.strip_prefix("Tandem job ")?
                .strip_suffix(" CA")?
                .to_string(),
        )
    }

    /// The authority whose certificate and key are these PEM texts.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Authority> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| tls_error("CA key", e))?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| tls_error("CA certificate", e))?;
        Ok(Authority {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            issuer,
        })
    }

    /// A certificate for `name` (its common name), reachable as `sans` (DNS names, IP addresses,
    /// `*.` wildcards), valid `days` days, for both the server and the client side of mutual TLS.
    pub fn issue(&self, name: &str, sans: &[String], days: u32) -> Result<Issued> {
        self.check_names(name, sans)?;
        let (from, until) = validity(days, "certificate validity")?;
        self.sign(name, sans, from, until)
    }

    /// Refuses an empty name, no alternative names, or one that is not a host name, a `*.`
    /// wildcard or an IP address.
    fn check_names(&self, name: &str, sans: &[String]) -> Result<()> {
        if name.is_empty() {
            return Err(Error::invalid("name", "a certificate needs a name"));
        }
        if sans.is_empty() {
            return Err(Error::invalid(
                "names",
                format!(
                    "the certificate of {name} lists no host name or address its peers reach it by"
                ),
            ));
        }
        if let Some(bad) = sans.iter().find(|n| !host_name(n)) {
            return Err(Error::invalid(
                "names",
                format!("{bad:?} is not a host name, a *. wildcard or an IP address"),
            ));
        }
        Ok(())
    }

    /// Issues the certificate of one process of the job: common name its role (`ps-1`), its
    /// organizational unit the job, and only the key usage its role needs (see
    /// [`crate::identity`]): a worker's cannot serve, the rendezvous's cannot dial.
    pub fn issue_identity(
        &self,
        id: &crate::identity::Identity,
        sans: &[String],
        days: u32,
    ) -> Result<Issued> {
        if id.job.is_empty() {
            return Err(Error::invalid("job", "an identity needs its job's name"));
        }
        self.check_names(&id.role.to_string(), sans)?;
        let (from, until) = validity(days, "certificate validity")?;
        let mut usages = Vec::new();
        if id.role.serves() {
            usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if id.role.dials() {
            usages.push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        self.sign_with(
            &id.role.to_string(),
            Some(&id.job),
            usages,
            sans,
            from,
            until,
        )
    }

    /// Signs a certificate for `name` and `sans`, valid from `from` to `until` (checked by
    /// [`Authority::issue`]; tests make expired ones with it).
    pub(crate) fn sign(
        &self,
        name: &str,
        sans: &[String],
        from: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<Issued> {
        let both = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.sign_with(name, None, both, sans, from, until)
    }

    /// Signs a certificate for `name` (with `sans`) carrying `job` (when it is an identity of the
    /// job) and `usages`, valid from `from` until `until`.
    fn sign_with(
        &self,
        name: &str,
        job: Option<&str>,
        usages: Vec<ExtendedKeyUsagePurpose>,
        sans: &[String],
        from: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<Issued> {
        let mut params =
            CertificateParams::new(sans.to_vec()).map_err(|e| tls_error("certificate names", e))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Tandem");
        if let Some(job) = job {
            params
                .distinguished_name
                .push(DnType::OrganizationalUnitName, job);
        }
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = usages;
        params.not_before = from;
        params.not_after = until;
        let key = KeyPair::generate().map_err(|e| tls_error("certificate key", e))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| tls_error("certificate", e))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use std::sync::Arc;

    /// Verifies `cert` for `name` as a TLS client trusting only `ca` would.
    fn verify(ca: &str, cert: &str, name: &str, at: UnixTime) -> std::result::Result<(), String> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        let end = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        verifier
            .verify_server_cert(
                &end,
                &[],
                &ServerName::try_from(name.to_string()).unwrap(),
                &[],
                at,
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn now() -> UnixTime {
        UnixTime::now()
    }

    #[test]
    fn issued_certificates_verify_for_their_names_against_their_authority_only() {
        let ca = Authority::generate("job-a", 30).unwrap();
        let names = vec![
            "rank-0.job-a".to_string(),
            "*.pods.svc".to_string(),
            "10.77.0.2".to_string(),
        ];
        let c = ca.issue("rank-0", &names, 30).unwrap();
        for n in ["rank-0.job-a", "ps-1.pods.svc", "10.77.0.2"] {
            assert_eq!(verify(&ca.cert_pem, &c.cert_pem, n, now()), Ok(()), "{n}");
        }
        let other_name = verify(&ca.cert_pem, &c.cert_pem, "rank-1.job-a", now()).unwrap_err();
        assert!(other_name.contains("not valid for name"), "{other_name}");
        let other_job = Authority::generate("job-b", 30).unwrap();
        let stranger = verify(&other_job.cert_pem, &c.cert_pem, "rank-0.job-a", now()).unwrap_err();
        assert!(stranger.to_lowercase().contains("issuer"), "{stranger}");
        // Reloaded from its files, the authority issues certificates that still verify.
        let again = Authority::from_pem(&ca.cert_pem, &ca.key_pem).unwrap();
        let c2 = again.issue("rank-1", &["rank-1.job-a".into()], 1).unwrap();
        assert_eq!(
            verify(&ca.cert_pem, &c2.cert_pem, "rank-1.job-a", now()),
            Ok(())
        );
    }

    #[test]
    fn validity_is_checked_at_both_ends() {
        let ca = Authority::generate("job", 30).unwrap();
        let names = vec!["h".to_string()];
        let c = ca.issue("p", &names, 2).unwrap();
        let day = 86_400;
        let at = |secs: u64| UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs));
        let t = now().as_secs();
        assert_eq!(verify(&ca.cert_pem, &c.cert_pem, "h", at(t + day)), Ok(()));
        let late = verify(&ca.cert_pem, &c.cert_pem, "h", at(t + 3 * day)).unwrap_err();
        assert!(late.contains("expired"), "{late}");
        let early = verify(&ca.cert_pem, &c.cert_pem, "h", at(t - 2 * 3600)).unwrap_err();
        assert!(early.contains("not valid yet"), "{early}");
        let old = ca
            .sign(
                "p",
                &names,
                OffsetDateTime::now_utc() - Duration::days(3),
                OffsetDateTime::now_utc() - Duration::days(1),
            )
            .unwrap();
        assert!(
            verify(&ca.cert_pem, &old.cert_pem, "h", now())
                .unwrap_err()
                .contains("expired")
        );
    }

    #[test]
    fn bad_requests_name_what_is_wrong() {
        let msg = |r: Result<Authority>| r.unwrap_err().to_string();
        assert!(msg(Authority::generate("", 1)).contains("needs a name"));
        assert!(msg(Authority::generate("j", 0)).contains("0 days"));
        assert!(Authority::generate("j", 1).is_ok());
        assert!(Authority::generate("j", MAX_DAYS).is_ok());
        assert!(msg(Authority::generate("j", MAX_DAYS + 1)).contains("give 1 to 3650"));
        let ca = Authority::generate("j", 1).unwrap();
        let e = |r: Result<Issued>| r.unwrap_err().to_string();
        assert!(e(ca.issue("", &["h".into()], 1)).contains("needs a name"));
        assert!(e(ca.issue("p", &[], 1)).contains("lists no host name"));
        assert!(e(ca.issue("p", &["h".into()], 0)).contains("0 days"));
        assert!(e(ca.issue("p", &["not a name!".into()], 1)).contains("not a host name"));
        assert!(e(ca.issue("p", &["a..b".into()], 1)).contains("not a host name"));
        assert!(e(ca.issue("p", &["*.".into()], 1)).contains("not a host name"));
        assert!(
            ca.issue("p", &["*.svc".into(), "::1".into(), "h-1.x".into()], 1)
                .is_ok()
        );
        assert!(msg(Authority::from_pem("junk", &ca.key_pem)).contains("CA certificate"));
        assert!(msg(Authority::from_pem(&ca.cert_pem, "junk")).contains("CA key"));
        assert!(
            !format!("{ca:?}").contains("PRIVATE"),
            "keys stay out of logs"
        );
        let c = ca.issue("p", &["h".into()], 1).unwrap();
        assert!(!format!("{c:?}").contains("PRIVATE"));
    }
}
