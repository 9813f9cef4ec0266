//! Every `TANDEM_*` variable, declared once: its name, what values it takes, its default and one
//! line of documentation, read by one routine ([`Setting::parse`]) so that a bad value gets the
//! same wording whichever crate reads it.
//!
//! Why one table: fifty variables read by hand across a dozen crates had drifted (one accepted
//! `off`, `0` and `false`, another only `1`, a third silently ignored a typo). Here a crate names
//! the [`Setting`] it reads ([`TIMEOUT`], [`SEGMENT_BYTES`], ...), [`check_all`] validates every
//! variable set in a process's environment when a group forms, and the configuration reference in
//! `docs/launching.md` is [`markdown`]'s output (a test keeps the two equal).
//!
//! ```
//! use std::time::Duration;
//! use tandem_core::settings;
//! let vars = [("TANDEM_TIMEOUT", "2.5"), ("TANDEM_SEGMENT_BYTES", "12")];
//! assert_eq!(settings::TIMEOUT.seconds(&vars).unwrap(), Some(Duration::from_millis(2500)));
//! let e = settings::SEGMENT_BYTES.count(&vars).unwrap_err().to_string();
//! assert!(e.contains("TANDEM_SEGMENT_BYTES") && e.contains("4096 to 67108864") && e.contains("\"12\""));
//! ```

use std::time::Duration;

use crate::error::{Error, Result};
use crate::vars::{Vars, check_address};

/// What values a variable takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// A positive, finite number of seconds, at most `max`.
    Seconds {
        /// The largest value allowed.
        max: f64,
    },
    /// A whole number from `min` to `max`.
    Integer {
        /// The smallest value allowed.
        min: u64,
        /// The largest value allowed.
        max: u64,
    },
    /// One of a fixed list of words (compared without case).
    Choice(&'static [&'static str]),
    /// On or off: `1`, `on`, `true`, `yes` or `0`, `off`, `false`, `no`.
    Switch,
    /// `MIN` or `MIN:MAX`, whole numbers with `1 <= MIN <= MAX`.
    Bounds,
    /// `host:port`.
    Address,
    /// A file or folder.
    Path,
    /// Free text that its reader interprets (a log filter, a name the kernel checks, a secret).
    Text,
}

impl Kind {
    /// What the values look like, as error messages and the docs say it.
    pub fn describe(&self) -> String {
        match self {
            Kind::Seconds { max } => format!("seconds, above 0 up to {max}"),
            Kind::Integer { min, max } => format!("an integer from {min} to {max}"),
            Kind::Choice(words) => format!("one of {}", words.join(", ")),
            Kind::Switch => "1 or 0 (on/off, true/false, yes/no)".into(),
            Kind::Bounds => "MIN or MIN:MAX with 1 <= MIN <= MAX".into(),
            Kind::Address => "host:port".into(),
            Kind::Path => "a path".into(),
            Kind::Text => "text".into(),
        }
    }
}

/// A value read by [`Setting::parse`].
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// From [`Kind::Seconds`].
    Seconds(Duration),
    /// From [`Kind::Integer`].
    Integer(u64),
    /// From [`Kind::Choice`]: the word as the table spells it.
    Choice(&'static str),
    /// From [`Kind::Switch`].
    Switch(bool),
    /// From [`Kind::Bounds`]: the minimum and the maximum if one was given.
    Bounds(u64, Option<u64>),
    /// From [`Kind::Address`], [`Kind::Path`] and [`Kind::Text`], trimmed.
    Text(String),
}

/// Who reads a variable, which orders the docs' table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Area {
    /// Identity, secrets and certificates.
    Security,
    /// Where the process stands in the job and how the ranks meet.
    Placement,
    /// How collectives move data.
    Collectives,
    /// Elastic training.
    Elastic,
    /// Logs, traces and metrics.
    Observe,
    /// Set by Tandem's own launchers for the programs they start.
    Launcher,
    /// Read by the test suites.
    Tests,
}

impl Area {
    /// The heading of this area's table in the docs.
    pub fn title(self) -> &'static str {
        match self {
            Area::Security => "Security",
            Area::Placement => "Placement and rendezvous",
            Area::Collectives => "Collectives",
            Area::Elastic => "Elastic training",
            Area::Observe => "Logs, traces and metrics",
            Area::Launcher => "Set or read by Tandem's launchers",
            Area::Tests => "Tests",
        }
    }
}

/// One `TANDEM_*` variable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Setting {
    /// The variable's name.
    pub name: &'static str,
    /// What values it takes.
    pub kind: Kind,
    /// What applies when it is unset, as the docs say it (empty: nothing).
    pub default: &'static str,
    /// One line of documentation.
    pub doc: &'static str,
    /// Who reads it.
    pub area: Area,
}

impl Setting {
    /// The error every reader gives for a bad `value`.
    pub fn invalid(&self, value: &str) -> Error {
        Error::config(
            self.name,
            format!("expected {}, got {value:?}", self.kind.describe()),
        )
    }

    /// Reads `raw` as this variable's [`Kind`] says: the one routine every `TANDEM_*` value goes
    /// through.
    pub fn parse(&self, raw: &str) -> Result<Value> {
        let v = raw.trim();
        let bad = || self.invalid(raw);
        match self.kind {
            Kind::Seconds { max } => v
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s > 0.0 && *s <= max)
                .map(|s| Value::Seconds(Duration::from_secs_f64(s)))
                .ok_or_else(bad),
            Kind::Integer { min, max } => v
                .parse::<u64>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .map(Value::Integer)
                .ok_or_else(bad),
            Kind::Choice(words) => words
                .iter()
                .find(|w| w.eq_ignore_ascii_case(v))
                .map(|w| Value::Choice(w))
                .ok_or_else(bad),
            Kind::Switch => match v.to_ascii_lowercase().as_str() {
                "1" | "on" | "true" | "yes" => Ok(Value::Switch(true)),
                "0" | "off" | "false" | "no" => Ok(Value::Switch(false)),
                _ => Err(bad()),
            },
            Kind::Bounds => parse_bounds(v).ok_or_else(bad),
            Kind::Address => {
                check_address(self.name, v)?;
                Ok(Value::Text(v.to_string()))
            }
            Kind::Path | Kind::Text => Ok(Value::Text(v.to_string())),
        }
    }

    /// This variable's value in `vars`: `None` when unset or empty.
    pub fn read(&self, vars: &(impl Vars + ?Sized)) -> Result<Option<Value>> {
        vars.var(self.name).map(|v| self.parse(&v)).transpose()
    }

    /// A [`Kind::Seconds`] variable.
    pub fn seconds(&self, vars: &(impl Vars + ?Sized)) -> Result<Option<Duration>> {
        self.typed(vars, |v| match v {
            Value::Seconds(d) => Some(d),
            _ => None,
        })
    }

    /// A [`Kind::Integer`] variable.
    pub fn integer(&self, vars: &(impl Vars + ?Sized)) -> Result<Option<u64>> {
        self.typed(vars, |v| match v {
            Value::Integer(n) => Some(n),
            _ => None,
        })
    }

    /// A [`Kind::Integer`] variable as a count of things in memory.
    pub fn count(&self, vars: &(impl Vars + ?Sized)) -> Result<Option<usize>> {
        match self.integer(vars)? {
            Some(n) => usize::try_from(n)
                .map(Some)
                .map_err(|_| self.invalid(&n.to_string())),
            None => Ok(None),
        }
    }

    /// A [`Kind::Choice`] variable: the word as the table spells it.
    pub fn choice(&self, vars: &(impl Vars + ?Sized)) -> Result<Option<&'static str>> {
        self.typed(vars, |v| match v {
            Value::Choice(w) => Some(w),
            _ => None,
        })
    }

    /// A [`Kind::Switch`] variable.
    pub fn switch(&self, vars: &(impl Vars + ?Sized)) -> Result<Option<bool>> {
        self.typed(vars, |v| match v {
            Value::Switch(b) => Some(b),
            _ => None,
        })
    }

    /// A [`Kind::Bounds`] variable.
    pub fn bounds(&self, vars: &(impl Vars + ?Sized)) -> Result<Option<(u64, Option<u64>)>> {
        self.typed(vars, |v| match v {
            Value::Bounds(a, b) => Some((a, b)),
            _ => None,
        })
    }

    /// A [`Kind::Address`], [`Kind::Path`] or [`Kind::Text`] variable, trimmed.
    pub fn text(&self, vars: &(impl Vars + ?Sized)) -> Result<Option<String>> {
        self.typed(vars, |v| match v {
            Value::Text(s) => Some(s),
            _ => None,
        })
    }

    /// A switch, with `default` when it is unset or (after [`check_all`] has refused it at the
    /// start) malformed: for readers that cannot fail.
    pub fn switch_or(&self, default: bool) -> bool {
        self.switch(&crate::vars::ProcessEnv)
            .ok()
            .flatten()
            .unwrap_or(default)
    }

    fn typed<T>(
        &self,
        vars: &(impl Vars + ?Sized),
        pick: impl FnOnce(Value) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.read(vars)? {
            None => Ok(None),
            Some(v) => pick(v).map(Some).ok_or_else(|| {
                Error::config(
                    self.name,
                    format!("is declared as {:?} and read as another kind", self.kind),
                )
            }),
        }
    }
}

fn parse_bounds(v: &str) -> Option<Value> {
    let (a, b) = match v.split_once(':') {
        Some((a, b)) => (a, Some(b)),
        None => (v, None),
    };
    let min: u64 = a.trim().parse().ok()?;
    let max: Option<u64> = match b {
        Some(b) => Some(b.trim().parse().ok()?),
        None => None,
    };
    (min >= 1 && max.is_none_or(|m| m >= min)).then_some(Value::Bounds(min, max))
}

macro_rules! settings {
    ($($(#[$doc:meta])* $id:ident = $name:literal, $kind:expr, $default:literal, $area:ident, $line:literal;)*) => {
        $(
            $(#[$doc])*
            #[doc = concat!("`", $name, "`: ", $line)]
            pub const $id: Setting = Setting {
                name: $name,
                kind: $kind,
                default: $default,
                doc: $line,
                area: Area::$area,
            };
        )*
        /// Every variable, in the order of the docs' table.
        pub const ALL: &[Setting] = &[$($id),*];
    };
}

const DAY: f64 = 86_400.0;

settings! {
    JOB_TOKEN = "TANDEM_JOB_TOKEN", Kind::Text, "", Security,
        "the job's shared secret; every rendezvous request and connection carries it (required for multi-process jobs across machines)";
    TLS_DIR = "TANDEM_TLS_DIR", Kind::Path, "", Security,
        "folder with the job's `ca.pem` and this process's `cert.pem`, `key.pem`: every connection is mutual TLS (`tandem launch` sets it)";
    TLS_CA = "TANDEM_TLS_CA", Kind::Path, "", Security,
        "the job's CA certificate, named alone (overrides the folder's)";
    TLS_CERT = "TANDEM_TLS_CERT", Kind::Path, "", Security,
        "this process's certificate, named alone (overrides the folder's)";
    TLS_KEY = "TANDEM_TLS_KEY", Kind::Path, "", Security,
        "this process's private key, named alone (overrides the folder's)";
    INSECURE = "TANDEM_INSECURE", Kind::Switch, "0", Security,
        "`1`: plaintext between hosts too (a warning at every start); without it and without certificates, only loopback peers are allowed";
    LOCAL_SOCKETS = "TANDEM_LOCAL_SOCKETS", Kind::Switch, "1", Security,
        "`1`: processes of one machine connect over Unix domain sockets, the kernel checking that both run as the same user, instead of TLS over loopback; `0`: over TCP as between machines";
    RANK = "TANDEM_RANK", Kind::Integer { min: 0, max: 1 << 24 }, "", Placement,
        "this process's rank";
    WORLD_SIZE = "TANDEM_WORLD_SIZE", Kind::Integer { min: 1, max: 1 << 24 }, "", Placement,
        "the number of processes";
    LOCAL_RANK = "TANDEM_LOCAL_RANK", Kind::Integer { min: 0, max: 1 << 16 }, "0", Placement,
        "this process's rank among those of its machine";
    LOCAL_WORLD_SIZE = "TANDEM_LOCAL_WORLD_SIZE", Kind::Integer { min: 1, max: 1 << 16 }, "", Placement,
        "the number of processes on this machine";
    NODE_RANK = "TANDEM_NODE_RANK", Kind::Integer { min: 0, max: 1 << 24 }, "", Placement,
        "this machine's index in the job";
    ROLE = "TANDEM_ROLE", Kind::Choice(&["chief", "master", "worker", "ps", "evaluator"]), "", Placement,
        "this process's role in a parameter-server job";
    ROLE_INDEX = "TANDEM_ROLE_INDEX", Kind::Integer { min: 0, max: 1 << 24 }, "", Placement,
        "this process's index within its role";
    LAUNCHER = "TANDEM_LAUNCHER", Kind::Choice(&["tandem", "tf_config", "torchrun", "slurm", "openmpi", "pmi"]), "", Placement,
        "force one convention instead of detecting it";
    RENDEZVOUS_ADDR = "TANDEM_RENDEZVOUS_ADDR", Kind::Address, "", Placement,
        "`host:port` of the rendezvous, overriding what the convention implies";
    RENDEZVOUS_BIND = "TANDEM_RENDEZVOUS_BIND", Kind::Address, "", Placement,
        "the address rank 0 binds for the rendezvous (default: the rendezvous address; under torchrun and in the torch backend: loopback on one machine, else the interface towards `MASTER_ADDR`, port 0)";
    RENDEZVOUS_EXTERNAL = "TANDEM_RENDEZVOUS_EXTERNAL", Kind::Switch, "0", Placement,
        "`1` when a launcher hosts the rendezvous, so rank 0 does not";
    RENDEZVOUS_PORT = "TANDEM_RENDEZVOUS_PORT", Kind::Integer { min: 1, max: 65535 }, "15000 + job id mod 5000", Placement,
        "under Slurm, the rendezvous port on the first node";
    RENDEZVOUS_DIR = "TANDEM_RENDEZVOUS_DIR", Kind::Path, "the working directory", Placement,
        "under bare mpirun, where rank 0 publishes the rendezvous address (a folder every node shares)";
    ADVERTISE_HOST = "TANDEM_ADVERTISE_HOST", Kind::Text, "", Placement,
        "the host other ranks connect to for this rank's listeners (default: derived from the route to the rendezvous)";
    TIMEOUT = "TANDEM_TIMEOUT", Kind::Seconds { max: DAY }, "300", Collectives,
        "deadline of each collective, seconds";
    CONNECT_TIMEOUT = "TANDEM_CONNECT_TIMEOUT", Kind::Seconds { max: DAY }, "120", Collectives,
        "deadline for meeting the other ranks, seconds";
    SEGMENT_BYTES = "TANDEM_SEGMENT_BYTES", Kind::Integer { min: 4096, max: 64 << 20 }, "1048576", Collectives,
        "ring pipeline segment";
    DIRECT_BYTES = "TANDEM_DIRECT_BYTES", Kind::Integer { min: 0, max: 16 << 20 }, "65536", Collectives,
        "one-hop allreduce threshold for buffer × (n−1) (0 = always ring)";
    BACKEND = "TANDEM_BACKEND", Kind::Choice(&["auto", "tcp", "nccl"]), "auto", Collectives,
        "`auto`: NCCL for GPU buffers when it works, else the TCP ring through the host, with one log line saying why; `nccl`: an error where NCCL cannot be used (needs a build with `--features nccl`). Host buffers always use the TCP ring";
    SAME_HOST = "TANDEM_SAME_HOST", Kind::Choice(&["auto", "tcp"]), "auto", Collectives,
        "`auto`: processes on one machine copy tensors straight from each other's memory (Linux `process_vm_readv`; ring steps of the collectives, pushes and pulls of the parameter server), after a probe proves it works; `tcp`: every byte through the sockets";
    SAME_HOST_MIN_BYTES = "TANDEM_SAME_HOST_MIN_BYTES", Kind::Integer { min: 0, max: 1 << 40 }, "262144", Collectives,
        "smallest collective buffer whose ring steps copy by address; smaller ones stay on the sockets";
    HIERARCHICAL = "TANDEM_HIERARCHICAL", Kind::Choice(&["auto", "off"]), "auto", Collectives,
        "`auto`: large allreduces over several hosts of equally many ranks go within hosts, across, within; `off`: the flat ring";
    STREAMS_PER_PEER = "TANDEM_STREAMS_PER_PEER", Kind::Integer { min: 1, max: 8 }, "1", Collectives,
        "connections per pair of ranks, the same on every rank: allreduces and broadcasts of at least 1 MiB are cut into that many parts, each around its own ring of connections driven by its own thread";
    TCP_CONGESTION = "TANDEM_TCP_CONGESTION", Kind::Text, "cubic where the kernel allows it", Collectives,
        "TCP congestion control of the ring's connections: `system` (the machine's), or a name such as `bbr` or `reno` (a refused name stops the rank before it joins)";
    COMPRESSION = "TANDEM_COMPRESSION", Kind::Text, "none", Collectives,
        "how gradients (and parameter-server pulls) are compressed on the wire: `none`, `fp16`, `bf16`, `topk:FRACTION` (with error feedback), `powersgd:RANK` (allreduces) or `auto` (bf16 where the measured links make it faster); a group's default for its compressors, and the setting of parameter-server workers and servers (which must agree)";
    FUSION_BYTES = "TANDEM_FUSION_BYTES", Kind::Integer { min: 1, max: 1 << 40 }, "67108864", Collectives,
        "size of one fusion bucket of `tandem.torch.DistributedOptimizer`";
    ELASTIC = "TANDEM_ELASTIC", Kind::Bounds, "1:1024", Elastic,
        "`MIN[:MAX]` members of an elastic job";
    ELASTIC_SETTLE = "TANDEM_ELASTIC_SETTLE", Kind::Seconds { max: 3600.0 }, "2", Elastic,
        "how long membership must stay unchanged before a new group forms, seconds";
    ELASTIC_WAIT = "TANDEM_ELASTIC_WAIT", Kind::Seconds { max: 3600.0 }, "120", Elastic,
        "how long members wait for MIN of them, seconds";
    ELASTIC_ID = "TANDEM_ELASTIC_ID", Kind::Integer { min: 0, max: u64::MAX }, "the rank", Elastic,
        "this member's identity across re-formations";
    LOG = "TANDEM_LOG", Kind::Text, "warn", Observe,
        "log filter, e.g. `info` or `tandem_rendezvous=debug`";
    LOG_DIR = "TANDEM_LOG_DIR", Kind::Path, "", Observe,
        "the launch's log folder (set by `tandem launch`); flight-recorder dumps go to `trace/` in it";
    TRACE_DIR = "TANDEM_TRACE_DIR", Kind::Path, "`tandem-trace/` in the temporary folder", Observe,
        "where flight-recorder dumps go";
    TRACE_ENTRIES = "TANDEM_TRACE_ENTRIES", Kind::Integer { min: 1, max: 1 << 20 }, "2048", Observe,
        "operations the flight recorder keeps";
    TIMELINE = "TANDEM_TIMELINE", Kind::Path, "", Observe,
        "write a Chrome-trace timeline of every operation to this folder";
    METRICS_ADDR = "TANDEM_METRICS_ADDR", Kind::Address, "", Observe,
        "serve Prometheus metrics at `host:port` (process i of a host at port + i)";
    JOB_NAME = "TANDEM_JOB_NAME", Kind::Text, "tandem", Observe,
        "the `job` label of metrics and dumps";
    OBSERVE = "TANDEM_OBSERVE", Kind::Switch, "on", Observe,
        "`off` turns the flight recorder and metrics off";
    TOPOLOGY_FILE = "TANDEM_TOPOLOGY_FILE", Kind::Path, "", Launcher,
        "a recorded `nvidia-smi topo -m` for `tandem launch --gpus auto` (containers without the tool)";
    CLI = "TANDEM_CLI", Kind::Text, "", Launcher,
        "the command that runs the `tandem` CLI, for launchers started from the Python package";
    PYTHON = "TANDEM_PYTHON", Kind::Path, "`python3`", Launcher,
        "the interpreter `tandem launch` runs Python scripts with";
    TRIAL_NAME = "TANDEM_TRIAL_NAME", Kind::Text, "", Launcher,
        "set by `tandem tune` for each trial it runs";
    EXPERIMENT = "TANDEM_EXPERIMENT", Kind::Text, "", Launcher,
        "set by `tandem tune`: the experiment's name";
    TESTBED = "TANDEM_TESTBED", Kind::Switch, "on", Tests,
        "`off` skips the tests on simulated hosts (they say so loudly); they need root to make network namespaces";
    TEST_TRANSPORT = "TANDEM_TEST_TRANSPORT", Kind::Choice(&["tls", "plain", "local"]), "tls", Tests,
        "how the multi-process test suites connect: mutual TLS over TCP, plaintext, or local sockets (`scripts/test` runs all three)";
}

/// The setting named `name`.
pub fn find(name: &str) -> Option<&'static Setting> {
    ALL.iter().find(|s| s.name == name)
}

/// Reads every `TANDEM_*` variable set in `vars` that the table declares, so that a bad value
/// stops the start with its name whichever crate would read it later; names the table does not
/// know are returned (a typo's likely sign) for the caller to warn about.
pub fn check_all(vars: &(impl Vars + ?Sized), names: &[String]) -> Result<Vec<String>> {
    let mut unknown = Vec::new();
    for name in names.iter().filter(|n| n.starts_with("TANDEM_")) {
        match find(name) {
            Some(s) => {
                s.read(vars)?;
            }
            None if name.starts_with("TANDEM_TEST_") => {}
            None => unknown.push(name.clone()),
        }
    }
    Ok(unknown)
}

/// [`check_all`] over this process's environment; the names it does not know are logged once
/// per process as likely typos.
pub fn check_env() -> Result<()> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let names: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .collect();
    let unknown = check_all(&crate::vars::ProcessEnv, &names)?;
    WARNED.call_once(|| {
        for name in unknown {
            tracing::warn!("{name} is set, but Tandem reads no such variable (a typo?)");
        }
    });
    Ok(())
}

/// The configuration reference as Markdown, a table per [`Area`]: what `docs/launching.md` holds
/// between its `settings` markers.
pub fn markdown() -> String {
    let mut out = String::new();
    let mut area = None;
    for s in ALL {
        if area != Some(s.area) {
            area = Some(s.area);
            out.push_str(&format!(
                "\n#### {}\n\n| variable | values | default | meaning |\n| --- | --- | --- | --- |\n",
                s.area.title()
            ));
        }
        let values = match s.kind {
            Kind::Choice(words) => words
                .iter()
                .map(|w| format!("`{w}`"))
                .collect::<Vec<_>>()
                .join(", "),
            k => k.describe(),
        };
        let default = if s.default.is_empty() || s.default.contains([' ', '`']) {
            s.default.to_string()
        } else {
            format!("`{}`", s.default)
        };
        out.push_str(&format!(
            "| `{}` | {values} | {default} | {} |\n",
            s.name, s.doc
        ));
    }
    out
}

#[cfg(test)]
mod tests;
