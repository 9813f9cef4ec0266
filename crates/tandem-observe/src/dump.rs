//! Flight-recorder dumps: one JSON file per process, `<dir>/<role>-<index>.dump.json`, written on a
//! timeout, an abort, an error and `SIGUSR1` (a later dump replaces an earlier one: it holds more).
//!
//! The folder is [`TRACE_DIR_VAR`](crate::TRACE_DIR_VAR), else `trace/` under the launcher's log
//! folder ([`LOG_DIR_VAR`](crate::LOG_DIR_VAR)), else `tandem-trace/` in the system's temporary
//! folder.

use std::path::{Path, PathBuf};
use std::sync::Once;

use serde::{Deserialize, Serialize};

use crate::Identity;
use crate::recorder::{self, Entry};

/// The `format` field of a dump.
pub const FORMAT: &str = "tandem-flight-recorder/1";

/// A dump file's content.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dump {
    /// [`FORMAT`].
    pub format: String,
    /// Whose dump.
    pub identity: Identity,
    /// Its process id.
    pub pid: u32,
    /// Why it was written ("timeout: ...", "SIGUSR1", ...).
    pub reason: String,
    /// When (µs since the Unix epoch).
    pub written_us: u64,
    /// The operations recorded, oldest first.
    pub ops: Vec<Entry>,
}

/// The folder dumps go to.
pub fn dir() -> PathBuf {
    if let Some(d) = std::env::var_os(crate::TRACE_DIR_VAR).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os(crate::LOG_DIR_VAR).filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("trace");
    }
    std::env::temp_dir().join("tandem-trace")
}

/// The dump of this process now, if it has an identity.
pub fn take(reason: &str) -> Option<Dump> {
    let identity = crate::identity()?;
    Some(Dump {
        format: FORMAT.into(),
        identity,
        pid: std::process::id(),
        reason: reason.to_string(),
        written_us: crate::now_us(),
        ops: recorder::snapshot(),
    })
}

/// Writes this process's dump to [`dir`] and logs where; returns the path. Nothing happens while
/// recording is off; a failure to write is logged, never raised (the error being reported matters
/// more).
pub fn write(reason: &str) -> Option<PathBuf> {
    if !crate::active() {
        return None;
    }
    let dump = take(reason)?;
    let dir = dir();
    match write_to(&dir, &dump) {
        Ok(path) => {
            tracing::warn!("flight recorder written to {} ({reason})", path.display());
            Some(path)
        }
        Err(e) => {
            tracing::warn!(
                "could not write the flight recorder to {}: {e}",
                dir.display()
            );
            None
        }
    }
}

/// Writes `dump` into `dir` (made if missing) through a temporary file, so a reader never sees
/// half a dump.
pub fn write_to(dir: &Path, dump: &Dump) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{}.dump.json", dump.identity.stem()));
    let tmp = dir.join(format!(".{}.dump.json.{}", dump.identity.stem(), dump.pid));
    let text = serde_json::to_vec_pretty(dump).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Reads a dump file, saying what is wrong with one that is not.
pub fn read(path: &Path) -> Result<Dump, crate::ReadError> {
    use crate::ReadError;
    let text = std::fs::read(path).map_err(|source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let dump: Dump = serde_json::from_slice(&text).map_err(|e| ReadError::NotA {
        path: path.to_path_buf(),
        what: "flight-recorder dump",
        detail: e.to_string(),
    })?;
    if dump.format != FORMAT {
        return Err(ReadError::NotA {
            path: path.to_path_buf(),
            what: "dump this Tandem reads",
            detail: format!("its format is {:?}, not {FORMAT:?}", dump.format),
        });
    }
    Ok(dump)
}

/// Dumps on every `SIGUSR1` from now on (once per process; a thread waits for the signal).
pub(crate) fn install_signal() {
    /// Set once the signal thread runs.
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut signals = match signal_hook::iterator::Signals::new([signal_hook::consts::SIGUSR1])
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("SIGUSR1 will not dump the flight recorder: {e}");
                return;
            }
        };
        let spawned = std::thread::Builder::new()
            .name("tandem-sigusr1".into())
            .spawn(move || {
                for _ in signals.forever() {
                    write("SIGUSR1");
                    crate::timeline::flush();
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("SIGUSR1 will not dump the flight recorder: {e}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_round_trips_and_a_foreign_file_is_named() {
        let dir = std::env::temp_dir().join(format!("tandem-dump-test-{}", std::process::id()));
        let dump = Dump {
            format: FORMAT.into(),
            identity: Identity::new("rank", 3, 4),
            pid: 7,
            reason: "SIGUSR1".into(),
            written_us: 1,
            ops: vec![Entry::new(0, "barrier", "u8", 4)],
        };
        let path = write_to(&dir, &dump).unwrap();
        assert!(path.ends_with("rank-3.dump.json"));
        let back = read(&path).unwrap();
        assert_eq!(back.ops, dump.ops);
        assert_eq!(back.identity, dump.identity);
        let other = dir.join("other.json");
        std::fs::write(&other, b"{\"format\":\"x\"}").unwrap();
        assert!(
            read(&other)
                .unwrap_err()
                .to_string()
                .contains("not a flight-recorder dump")
        );
        let mut wrong = dump.clone();
        wrong.format = "tandem-flight-recorder/9".into();
        let p = write_to(&dir, &wrong).unwrap();
        assert!(
            read(&p)
                .unwrap_err()
                .to_string()
                .contains("this Tandem reads")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
