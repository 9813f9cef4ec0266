//! Who a process is within its job, as its certificate says: a role and an index (`rank-3`,
//! `worker-0`, `ps-1`, `chief`, `rendezvous`, the certificate's common name) and the job (its
//! organizational unit). A certificate is issued with the key usage its role needs: roles that
//! serve connections (ranks, parameter servers, the chief and worker 0, which may host the
//! rendezvous, the rendezvous itself) for TLS server use, roles that open connections (every role
//! but the rendezvous) for client use; TLS itself then refuses a worker's certificate on a server.
//!
//! A process whose own certificate names an identity checks its peers' ([`check_peer`]): the
//! peer must belong to the same job and hold a role the connection expects. A process with a
//! certificate that names none (one shared by a whole job, from earlier versions) checks the CA
//! only.
//!
//! ```
//! use tandem_tls::identity::{Identity, Role};
//! let id = Identity::parse("ps-1", "job-a").unwrap();
//! assert_eq!(id.role, Role::Ps(1));
//! assert!(id.role.serves() && id.role.dials());
//! assert!(!Role::Worker(3).serves(), "a worker serves nothing");
//! assert!(Role::parse("worker-x").is_none());
//! ```

/// A process's role in its job, with its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Rank `n` of an allreduce group (a PyTorchJob's processes; rank 0 may host the rendezvous).
    Rank(usize),
    /// Worker `n` of a parameter-server job (worker 0 may host the rendezvous).
    Worker(usize),
    /// Parameter server `n` (also follows another as its standby).
    Ps(usize),
    /// The chief of a TFJob (may host the rendezvous).
    Chief,
    /// A rendezvous server of its own (`tandem rendezvous`, or the launcher's).
    Rendezvous,
}

impl Role {
    /// Parses `rank-N`, `worker-N`, `ps-N`, `chief` or `rendezvous`.
    pub fn parse(s: &str) -> Option<Role> {
        let indexed = |prefix: &str| s.strip_prefix(prefix)?.parse::<usize>().ok();
        match s {
            "chief" => Some(Role::Chief),
            "rendezvous" => Some(Role::Rendezvous),
            _ => indexed("rank-")
                .map(Role::Rank)
                .or_else(|| indexed("worker-").map(Role::Worker))
                .or_else(|| indexed("ps-").map(Role::Ps)),
        }
    }

    /// Whether this role accepts connections (its certificate is for TLS server use).
    pub fn serves(&self) -> bool {
        !matches!(self, Role::Worker(n) if *n > 0)
    }

    /// Whether this role opens connections (its certificate is for TLS client use).
    pub fn dials(&self) -> bool {
        !matches!(self, Role::Rendezvous)
    }

    /// Whether this role may host the job's rendezvous.
    pub fn hosts_rendezvous(&self) -> bool {
        matches!(
            self,
            Role::Rendezvous | Role::Chief | Role::Rank(0) | Role::Worker(0)
        )
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Rank(n) => write!(f, "rank-{n}"),
            Role::Worker(n) => write!(f, "worker-{n}"),
            Role::Ps(n) => write!(f, "ps-{n}"),
            Role::Chief => f.write_str("chief"),
            Role::Rendezvous => f.write_str("rendezvous"),
        }
    }
}

/// A process of a job: what its certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The job's name.
    pub job: String,
    /// Its role and index.
    pub role: Role,
}

impl Identity {
    /// `role` (as [`Role::parse`] reads it) in `job`; `None` when the role is not one.
    pub fn parse(role: &str, job: &str) -> Option<Identity> {
        (!job.is_empty()).then_some(())?;
        Some(Identity {
            job: job.to_string(),
            role: Role::parse(role)?,
        })
    }

    /// The identity a certificate (DER) names: its common name and organizational unit.
    pub fn of_certificate(der: &[u8]) -> Option<Identity> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
        let ou = cert
            .subject()
            .iter_organizational_unit()
            .next()?
            .as_str()
            .ok()?;
        Identity::parse(cn, ou)
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} of job {}", self.role, self.job)
    }
}

/// Checks a peer's certificate for a connection of `what` where `expected` says which roles may
/// be at the other end: when this process's identity (`own`) is known, the peer must name an
/// identity of the same job with such a role. Returns why not, in words.
pub fn check_peer(
    own: Option<&Identity>,
    peer_der: Option<&[u8]>,
    what: &str,
    expected: &dyn Fn(&Role) -> bool,
) -> Result<(), PeerRefused> {
    let Some(own) = own else {
        return Ok(());
    };
    let what = what.to_string();
    let Some(peer) = peer_der.and_then(Identity::of_certificate) else {
        return Err(PeerRefused::NoRole {
            what,
            job: own.job.clone(),
        });
    };
    if peer.job != own.job {
        return Err(PeerRefused::OtherJob {
            what,
            peer: peer.to_string(),
            job: own.job.clone(),
        });
    }
    if !expected(&peer.role) {
        return Err(PeerRefused::WrongRole {
            what,
            peer: peer.to_string(),
        });
    }
    Ok(())
}

/// Why a peer's certificate does not let it act where it tried to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerRefused {
    /// Its certificate names no role of the job.
    #[error(
        "{what}: the peer's certificate names no role of job {job} (each process of a job has \
         its own, e.g. ps-0, worker-1, rank-2)"
    )]
    NoRole {
        /// The connection it is for.
        what: String,
        /// This process's job.
        job: String,
    },
    /// It belongs to another job.
    #[error("{what}: the peer is {peer}, not a process of job {job}")]
    OtherJob {
        /// The connection it is for.
        what: String,
        /// Who its certificate names.
        peer: String,
        /// This process's job.
        job: String,
    },
    /// Its role may not act here.
    #[error("{what}: the peer is {peer}, a role that may not act here")]
    WrongRole {
        /// The connection it is for.
        what: String,
        /// Who its certificate names.
        peer: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_and_print_back() {
        for s in [
            "rank-0",
            "rank-12",
            "worker-3",
            "ps-1",
            "chief",
            "rendezvous",
        ] {
            assert_eq!(Role::parse(s).expect(s).to_string(), s);
        }
        for bad in [
            "",
            "rank-",
            "rank--1",
            "worker-x",
            "ps1",
            "Chief",
            "evaluator-0",
            "rank-0 ",
        ] {
            assert!(Role::parse(bad).is_none(), "{bad:?}");
        }
        assert!(Identity::parse("ps-0", "").is_none(), "a job needs a name");
        let id = Identity::parse("ps-1", "train").expect("id");
        assert_eq!(
            id.to_string(),
            "ps-1 of job train",
            "refusals name the peer so"
        );
    }

    #[test]
    fn usage_follows_the_role() {
        assert!(Role::Rank(3).serves() && Role::Rank(3).dials());
        assert!(Role::Worker(0).serves(), "worker 0 may host the rendezvous");
        assert!(!Role::Worker(1).serves() && Role::Worker(1).dials());
        assert!(Role::Rendezvous.serves() && !Role::Rendezvous.dials());
        for r in [
            Role::Rendezvous,
            Role::Chief,
            Role::Rank(0),
            Role::Worker(0),
        ] {
            assert!(r.hosts_rendezvous(), "{r}");
        }
        for r in [Role::Rank(1), Role::Worker(1), Role::Ps(0)] {
            assert!(!r.hosts_rendezvous(), "{r}");
        }
    }

    #[test]
    fn peers_are_checked_only_by_processes_that_have_an_identity() {
        let any = |_: &Role| true;
        assert_eq!(check_peer(None, None, "x", &any), Ok(()));
        let own = Identity::parse("worker-1", "job").expect("id");
        let e = check_peer(Some(&own), None, "x", &any).expect_err("no certificate");
        assert!(matches!(e, PeerRefused::NoRole { .. }), "{e}");
        assert!(e.to_string().contains("names no role"), "{e}");
    }
}
