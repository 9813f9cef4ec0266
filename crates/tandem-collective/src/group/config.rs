//! How a group is formed and how long its operations may take: [`GroupConfig`], read from the
//! `TANDEM_*` variables with every bad value named.

use super::*;

/// The name of a process's default group: its ranks are the job's.
pub const DEFAULT_NAME: &str = "default";

/// How a group is formed and how long its operations may take.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// Name of the group; groups of one job need distinct names.
    pub name: String,
    /// Default deadline of each operation (`TANDEM_TIMEOUT`, seconds; default 300).
    pub timeout: Duration,
    /// Deadline for meeting the other ranks (`TANDEM_CONNECT_TIMEOUT`, seconds; default 120).
    pub connect_timeout: Duration,
    /// Pipeline segment in bytes (`TANDEM_SEGMENT_BYTES`; default 1 MiB).
    pub segment_bytes: usize,
    /// Allreduces whose buffer times `world - 1` is at most this many bytes go to every rank in one
    /// hop instead of around the ring (`TANDEM_DIRECT_BYTES`; default 64 KiB; 0 turns it off).
    pub direct_bytes: usize,
    /// Which backend (`TANDEM_BACKEND`).
    pub backend: BackendKind,
    /// Whether ranks on one machine may copy ring chunks straight from each other's memory
    /// (`TANDEM_SAME_HOST`: `auto`, the default, uses it when every rank's probe succeeds; `tcp`
    /// keeps every byte on the sockets).
    pub same_host: bool,
    /// Smallest ring buffer copied by address (`TANDEM_SAME_HOST_MIN_BYTES`; default 256 KiB):
    /// below it a copy's descriptor and acknowledgement per step cost more than the bytes.
    pub same_host_min_bytes: usize,
    /// Whether large allreduces across several hosts of several ranks each go hierarchical
    /// (within hosts, then across, then within: `TANDEM_HIERARCHICAL`, `auto` by default; `off`
    /// keeps the flat ring).
    pub hierarchical: bool,
    /// Connections per pair of ranks (`TANDEM_STREAMS_PER_PEER`, 1 to 8; default 1): with more than
    /// one, a large allreduce or broadcast is cut into that many parts, each moved around its own
    /// ring of connections by its own thread (as NCCL's `NCCL_SOCKET_NTHREADS` and
    /// `NCCL_NSOCKS_PERTHREAD` do), so the encryption, copies and reductions of one rank's traffic spread over several cores.
    /// Every rank of a group must use the same value. Pays on machines with cores to spare and
    /// fast links; ranks on one machine that copy by address never use the extra connections.
    pub streams_per_peer: usize,
    /// TCP congestion control of the group's connections (`TANDEM_TCP_CONGESTION`: unset, cubic
    /// where the kernel allows it; `system`; or a name). See [`crate::transport::congestion`] for why a
    /// ring prefers cubic to BBR.
    pub tcp_congestion: crate::transport::congestion::Congestion,
    /// Host other ranks should connect to (`TANDEM_ADVERTISE_HOST`); default: derived from the
    /// rendezvous address (loopback for local jobs, this machine's outgoing address otherwise).
    pub advertise_host: Option<String>,
    /// How the ring's connections are secured; `None`: from the process's environment
    /// (`tandem_tls::Security::from_env`: mutual TLS with the job's certificates, plaintext on
    /// loopback only unless `TANDEM_INSECURE=1`).
    pub security: Option<tandem_tls::Security>,
    /// How gradient allreduces through compressors made for this group compress what they send
    /// (`TANDEM_COMPRESSION`; default none): see [`crate::compression`].
    pub compression: crate::compression::Compression,
    /// Where rank 0 publishes the rendezvous it hosts when another program owns the agreed port
    /// (the Store torch hands a `torch.distributed` backend); `None`: torchrun's agent store when
    /// torchrun started this process, else the rendezvous address of the cluster spec.
    pub board: Option<tandem_rendezvous::board::BoardPlan>,
}

/// The variable that sets [`GroupConfig::streams_per_peer`].
pub const STREAMS_VAR: &str = tandem_core::settings::STREAMS_PER_PEER.name;

/// Most connections per pair of ranks a group may use.
pub const MAX_STREAMS_PER_PEER: usize = match tandem_core::settings::STREAMS_PER_PEER.kind {
    tandem_core::settings::Kind::Integer { max, .. } => max as usize,
    _ => 8,
};

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            name: DEFAULT_NAME.into(),
            timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(120),
            segment_bytes: 1 << 20,
            direct_bytes: 64 << 10,
            backend: BackendKind::Auto,
            same_host: true,
            same_host_min_bytes: 256 << 10,
            hierarchical: true,
            streams_per_peer: 1,
            tcp_congestion: crate::transport::congestion::Congestion::Preferred,
            advertise_host: None,
            security: None,
            board: None,
            compression: crate::compression::Compression::None,
        }
    }
}

impl GroupConfig {
    /// Defaults overridden by the `TANDEM_*` variables in `vars` (read as
    /// [`tandem_core::settings`] declares them).
    pub fn from_vars(vars: &(impl Vars + ?Sized)) -> Result<Self> {
        use tandem_core::settings as s;
        let mut c = GroupConfig::default();
        if let Some(t) = s::TIMEOUT.seconds(vars)? {
            c.timeout = t;
        }
        if let Some(t) = s::CONNECT_TIMEOUT.seconds(vars)? {
            c.connect_timeout = t;
        }
        c.segment_bytes = s::SEGMENT_BYTES.count(vars)?.unwrap_or(c.segment_bytes);
        c.direct_bytes = s::DIRECT_BYTES.count(vars)?.unwrap_or(c.direct_bytes);
        c.same_host_min_bytes = s::SAME_HOST_MIN_BYTES
            .count(vars)?
            .unwrap_or(c.same_host_min_bytes);
        c.streams_per_peer = s::STREAMS_PER_PEER
            .count(vars)?
            .unwrap_or(c.streams_per_peer);
        if let Some(v) = s::BACKEND.choice(vars)? {
            c.backend = v.parse()?;
        }
        if let Some(v) = s::SAME_HOST.choice(vars)? {
            c.same_host = v == "auto";
        }
        if let Some(v) = s::HIERARCHICAL.choice(vars)? {
            c.hierarchical = v == "auto";
        }
        if let Some(v) = s::TCP_CONGESTION.text(vars)? {
            c.tcp_congestion = v.parse()?;
        }
        c.advertise_host = s::ADVERTISE_HOST.text(vars)?;
        c.compression = crate::compression::Compression::from_vars(vars)?;
        Ok(c)
    }
}

#[cfg(test)]
mod config_tests {
    use super::*;

    fn c_default_hierarchical() -> bool {
        GroupConfig::from_vars(&vars(&[])).is_ok_and(|c| c.hierarchical)
    }

    pub(super) fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Each bound of each numeric setting, accepted on its side and refused past it, naming the
    /// variable; `auto` accepted where it is a choice.
    #[test]
    fn every_bound_is_checked_on_each_side() {
        let ok = |k: &str, v: &str| GroupConfig::from_vars(&vars(&[(k, v)])).expect(v);
        let bad = |k: &str, v: &str| {
            let e = GroupConfig::from_vars(&vars(&[(k, v)])).expect_err(v);
            assert!(e.to_string().contains(k), "{k}={v}: {e}");
        };
        assert_eq!(
            ok("TANDEM_TIMEOUT", "0.5").timeout,
            Duration::from_millis(500)
        );
        use crate::compression::Compression;
        assert_eq!(
            ok("TANDEM_COMPRESSION", "bf16").compression,
            Compression::Bf16
        );
        assert_eq!(
            ok("TANDEM_COMPRESSION", "topk:1").compression,
            Compression::TopK { fraction: 1.0 }
        );
        assert_eq!(GroupConfig::default().compression, Compression::None);
        bad("TANDEM_COMPRESSION", "topk:0");
        bad("TANDEM_COMPRESSION", "gzip");
        assert_eq!(
            ok("TANDEM_CONNECT_TIMEOUT", "7").connect_timeout,
            Duration::from_secs(7)
        );
        for v in ["0", "-1", "inf", "NaN", "soon"] {
            bad("TANDEM_TIMEOUT", v);
        }
        assert_eq!(ok("TANDEM_SEGMENT_BYTES", "4096").segment_bytes, 4096);
        assert_eq!(
            ok("TANDEM_SEGMENT_BYTES", "67108864").segment_bytes,
            64 << 20
        );
        bad("TANDEM_SEGMENT_BYTES", "4095");
        bad("TANDEM_SEGMENT_BYTES", "67108865");
        assert_eq!(ok("TANDEM_DIRECT_BYTES", "0").direct_bytes, 0);
        assert_eq!(ok("TANDEM_DIRECT_BYTES", "16777216").direct_bytes, 16 << 20);
        bad("TANDEM_DIRECT_BYTES", "16777217");
        assert!(ok("TANDEM_SAME_HOST", "auto").same_host);
        assert!(ok("TANDEM_HIERARCHICAL", "auto").hierarchical);
        let cc = crate::transport::congestion::CONGESTION_VAR;
        assert_eq!(
            GroupConfig::from_vars(&vars(&[]))
                .expect("defaults")
                .tcp_congestion,
            crate::transport::congestion::Congestion::Preferred
        );
        assert_eq!(
            ok(cc, "system").tcp_congestion,
            crate::transport::congestion::Congestion::System
        );
        assert_eq!(
            ok(cc, "reno").tcp_congestion,
            crate::transport::congestion::Congestion::Named("reno".into())
        );
        // Empty is unset, as for every variable.
        assert_eq!(
            ok(cc, " ").tcp_congestion,
            crate::transport::congestion::Congestion::Preferred
        );
        bad(cc, "not a name");
    }

    #[test]
    pub(super) fn same_host_settings_are_read_and_bad_values_are_named() {
        let c = GroupConfig::from_vars(&vars(&[])).expect("defaults");
        assert!(c.same_host);
        assert_eq!(c.same_host_min_bytes, 256 << 10);
        let c = GroupConfig::from_vars(&vars(&[
            ("TANDEM_SAME_HOST", "tcp"),
            ("TANDEM_SAME_HOST_MIN_BYTES", "0"),
        ]))
        .expect("valid");
        assert!(!c.same_host);
        assert_eq!(c.same_host_min_bytes, 0);
        assert!(c_default_hierarchical());
        let c = GroupConfig::from_vars(&vars(&[("TANDEM_HIERARCHICAL", "off")])).expect("valid");
        assert!(!c.hierarchical);
        assert_eq!(c.streams_per_peer, 1);
        for n in [1, 8] {
            let c = GroupConfig::from_vars(&vars(&[(STREAMS_VAR, &n.to_string())])).expect("valid");
            assert_eq!(c.streams_per_peer, n);
        }
        for (k, v) in [
            ("TANDEM_HIERARCHICAL", "yes"),
            ("TANDEM_SAME_HOST", "shm"),
            ("TANDEM_SAME_HOST_MIN_BYTES", "-1"),
            (STREAMS_VAR, "0"),
            (STREAMS_VAR, "9"),
            (STREAMS_VAR, "two"),
        ] {
            let e = GroupConfig::from_vars(&vars(&[(k, v)])).expect_err("invalid");
            assert!(e.to_string().contains(k), "{e}");
        }
    }
}
