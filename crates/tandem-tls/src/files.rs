//! Where certificates live: `tandem certs init`'s folder, and where a process finds its own.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use tandem_core::cluster::{ProcessEnv, Vars};
use tandem_core::{Error, Result};

use crate::authority::{Authority, Issued};

/// A folder holding `ca.pem`, `cert.pem` and `key.pem`.
pub const DIR_VAR: &str = tandem_core::settings::TLS_DIR.name;
/// The job's CA certificate (overrides the folder's).
pub const CA_VAR: &str = tandem_core::settings::TLS_CA.name;
/// This process's certificate (overrides the folder's).
pub const CERT_VAR: &str = tandem_core::settings::TLS_CERT.name;
/// This process's private key (overrides the folder's).
pub const KEY_VAR: &str = tandem_core::settings::TLS_KEY.name;
/// The CA certificate's file name in a folder.
pub const CA_FILE: &str = "ca.pem";
/// The CA key's file name (kept by whoever issues certificates; not needed by processes).
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// A process certificate's file name.
pub const CERT_FILE: &str = "cert.pem";
/// A process key's file name.
pub const KEY_FILE: &str = "key.pem";

/// The files of one process's TLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate every peer's certificate must chain to.
    pub ca: PathBuf,
    /// This process's certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files this process's environment names; `None` when it names none (no TLS
    /// configured). Naming some but not all, or files that do not exist, is an error saying which.
    pub fn from_env() -> Result<Option<TlsFiles>> {
        Self::from_vars(&ProcessEnv)
    }

    /// [`TlsFiles::from_env`] over any source of variables.
    pub fn from_vars(vars: &dyn Vars) -> Result<Option<TlsFiles>> {
        let get = |k: &str| vars.var(k).map(PathBuf::from);
        let dir = get(DIR_VAR);
        let pick = |var: &str, file: &str| get(var).or_else(|| dir.as_ref().map(|d| d.join(file)));
        let (ca, cert, key) = (
            pick(CA_VAR, CA_FILE),
            pick(CERT_VAR, CERT_FILE),
            pick(KEY_VAR, KEY_FILE),
        );
        let named = [(CA_VAR, &ca), (CERT_VAR, &cert), (KEY_VAR, &key)];
        if named.iter().all(|(_, p)| p.is_none()) {
            return Ok(None);
        }
        if let Some((var, _)) = named.iter().find(|(_, p)| p.is_none()) {
            return Err(Error::config(
                *var,
                format!(
                    "is not set while other TLS files are; set {DIR_VAR} to a folder with {CA_FILE}, {CERT_FILE} and {KEY_FILE}, or all three of {CA_VAR}, {CERT_VAR}, {KEY_VAR}"
                ),
            ));
        }
        let files = TlsFiles {
            ca: ca.unwrap_or_default(),
            cert: cert.unwrap_or_default(),
            key: key.unwrap_or_default(),
        };
        for (var, path) in [
            (CA_VAR, &files.ca),
            (CERT_VAR, &files.cert),
            (KEY_VAR, &files.key),
        ] {
            if !path.is_file() {
                return Err(Error::config(
                    var,
                    format!(
                        "{} does not exist (make a job's certificates with `tandem certs init DIR`)",
                        path.display()
                    ),
                ));
            }
        }
        Ok(Some(files))
    }
}

/// A PEM file's text, naming the file when it cannot be read.
fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))
}

/// Writes `text` to `path`, readable by its owner only when `private`.
fn write(path: &Path, text: &str, private: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    if private {
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// What [`init`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Made {
    /// A new authority was made (false: the folder's was used).
    pub new_authority: bool,
    /// The files written.
    pub written: Vec<PathBuf>,
}

/// `tandem certs init DIR`: makes the job's authority in `dir` (`ca.pem`, `ca-key.pem`; an
/// authority already there is used, never replaced) and a process certificate for `names`
/// (`cert.pem`, `key.pem`) in `out` (default `dir`), valid `days` days. Refuses to overwrite a
/// certificate already in `out`.
pub fn init(
    dir: &Path,
    out: Option<&Path>,
    job: &str,
    names: &[String],
    days: u32,
) -> Result<Made> {
    init_as(dir, out, job, job, names, days)
}

/// The CA of the folder (`ca.pem` with `ca-key.pem`), or a new one for `job` when the folder has
/// neither (`true`: not written yet); one without the other is an error naming both.
fn authority(
    ca_path: &Path,
    ca_key_path: &Path,
    job: &str,
    days: u32,
) -> Result<(Authority, bool)> {
    match (ca_path.exists(), ca_key_path.exists()) {
        (true, true) => Ok((
            Authority::from_pem(&read(ca_path)?, &read(ca_key_path)?)?,
            false,
        )),
        (false, false) => Ok((Authority::generate(job, days.max(1))?, true)),
        (true, false) => Err(Error::invalid(
            "DIR",
            format!(
                "{} exists without {}: certificates cannot be issued without the CA's key",
                ca_path.display(),
                ca_key_path.display()
            ),
        )),
        (false, true) => Err(Error::invalid(
            "DIR",
            format!(
                "{} exists without {}",
                ca_key_path.display(),
                ca_path.display()
            ),
        )),
    }
}

/// [`init`] with the certificate's common name `identity` instead of the job's name: a role
/// (`rank-<n>`, `worker-<n>`, `ps-<n>`, `chief`, `rendezvous`) makes the certificate of that
/// process of job `job`, with the key usage of its role (see [`crate::identity`]).
pub fn init_as(
    dir: &Path,
    out: Option<&Path>,
    job: &str,
    identity: &str,
    names: &[String],
    days: u32,
) -> Result<Made> {
    let out = out.unwrap_or(dir);
    for f in [CERT_FILE, KEY_FILE] {
        let p = out.join(f);
        if p.exists() {
            return Err(Error::invalid(
                "DIR",
                format!(
                    "{} exists; nothing was changed (remove it, or issue into another folder with --out)",
                    p.display()
                ),
            ));
        }
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    std::fs::create_dir_all(out)
        .map_err(|e| Error::io(format!("creating {}", out.display()), e))?;
    let (ca_path, ca_key_path) = (dir.join(CA_FILE), dir.join(CA_KEY_FILE));
    let mut written = Vec::new();
    let (ca, new_authority) = authority(&ca_path, &ca_key_path, job, days)?;
    // A role (`ps-0`, `worker-1`, `rank-2`, `chief`, `rendezvous`) makes an identity of the job
    // with its role's key usage; any other name, a certificate checked by the CA alone.
    // An identity belongs to the CA's job (a CA reused for another job name would make
    // certificates its peers refuse).
    let job = ca.job().unwrap_or_else(|| job.to_string());
    let Issued { cert_pem, key_pem } = match crate::identity::Identity::parse(identity, &job) {
        Some(id) => ca.issue_identity(&id, names, days)?,
        None => ca.issue(identity, names, days)?,
    };
    if new_authority {
        write(&ca_path, &ca.cert_pem, false)?;
        write(&ca_key_path, &ca.key_pem, true)?;
        written.extend([ca_path.clone(), ca_key_path]);
    }
    if out != dir {
        // The process's folder is complete on its own (TANDEM_TLS_DIR=out).
        let copy = out.join(CA_FILE);
        if !copy.exists() {
            write(&copy, &ca.cert_pem, false)?;
            written.push(copy);
        }
    }
    write(&out.join(CERT_FILE), &cert_pem, false)?;
    write(&out.join(KEY_FILE), &key_pem, true)?;
    written.extend([out.join(CERT_FILE), out.join(KEY_FILE)]);
    Ok(Made {
        new_authority,
        written,
    })
}

/// `tandem certs kubernetes DIR`: a Secret holding `ca.pem`, `cert.pem` and `key.pem` of `dir`
/// (mount it and set `TANDEM_TLS_DIR` to the mount), named `name` in `namespace`.
pub fn kubernetes_secret(dir: &Path, name: &str, namespace: Option<&str>) -> Result<String> {
    let mut files = Vec::new();
    for f in [CA_FILE, CERT_FILE, KEY_FILE] {
        files.push((f.to_string(), read(&dir.join(f))?));
    }
    secret_yaml(
        "The job's TLS files; mount it and set TANDEM_TLS_DIR to the mount path.",
        name,
        namespace,
        &files,
    )
}

/// A Kubernetes Secret named `name` holding `files` (key, PEM text), after a `# comment` line;
/// an error naming `--name` or `--namespace` when one is not a Kubernetes name.
pub fn secret_yaml(
    comment: &str,
    name: &str,
    namespace: Option<&str>,
    files: &[(String, String)],
) -> Result<String> {
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    };
    if !valid(name) {
        return Err(Error::invalid(
            "--name",
            format!(
                "{name:?} is not a Kubernetes object name (lower-case letters, digits, '-', '.')"
            ),
        ));
    }
    if let Some(ns) = namespace
        && !valid(ns)
    {
        return Err(Error::invalid(
            "--namespace",
            format!("{ns:?} is not a Kubernetes namespace name"),
        ));
    }
    let ns = namespace.map_or(String::new(), |n| format!("  namespace: {n}\n"));
    let mut out = format!(
        "# {comment}\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n{ns}type: Opaque\ndata:\n"
    );
    for (key, bytes) in files {
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        out.push_str(&format!("  {key}: {b64}\n"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tandem-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn init_makes_an_authority_once_and_never_overwrites() {
        let dir = temp("init");
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let made = init(&dir, None, "job", &names, 7).unwrap();
        assert!(made.new_authority);
        assert_eq!(made.written.len(), 4);
        let mode = |f: &str| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode(CA_KEY_FILE), 0o600);
        assert_eq!(mode(KEY_FILE), 0o600);
        let ca_before = std::fs::read_to_string(dir.join(CA_FILE)).unwrap();
        let again = init(&dir, None, "job", &names, 7).unwrap_err().to_string();
        assert!(again.contains("exists; nothing was changed"), "{again}");
        // Another process's certificate from the same authority, in its own folder.
        let host = dir.join("host-1");
        let made = init(&dir, Some(&host), "job", &["host-1".into()], 7).unwrap();
        assert!(!made.new_authority);
        assert_eq!(
            std::fs::read_to_string(dir.join(CA_FILE)).unwrap(),
            ca_before
        );
        assert_eq!(
            std::fs::read_to_string(host.join(CA_FILE)).unwrap(),
            ca_before
        );
        let env = vars(&[(DIR_VAR, host.to_str().unwrap())]);
        let files = TlsFiles::from_vars(&env).unwrap().unwrap();
        assert_eq!(files.cert, host.join(CERT_FILE));
        // A CA without its key cannot issue.
        let lone = temp("lone");
        std::fs::create_dir_all(&lone).unwrap();
        std::fs::copy(dir.join(CA_FILE), lone.join(CA_FILE)).unwrap();
        let e = init(&lone, None, "job", &names, 7).unwrap_err().to_string();
        assert!(e.contains("without"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&lone);
    }

    #[test]
    fn the_environment_names_all_three_files_or_none() {
        assert_eq!(TlsFiles::from_vars(&vars(&[])).unwrap(), None);
        assert_eq!(TlsFiles::from_vars(&vars(&[(DIR_VAR, "")])).unwrap(), None);
        let dir = temp("env");
        init(&dir, None, "job", &["localhost".into()], 1).unwrap();
        let d = dir.to_str().unwrap();
        let ca = dir.join(CA_FILE);
        let ca = ca.to_str().unwrap();
        // The folder, with one file taken from elsewhere.
        let other = dir.join(CA_KEY_FILE);
        let f = TlsFiles::from_vars(&vars(&[(DIR_VAR, d), (CA_VAR, other.to_str().unwrap())]))
            .unwrap()
            .unwrap();
        assert_eq!(f.ca, other);
        // Two of three variables without a folder.
        let e = TlsFiles::from_vars(&vars(&[(CA_VAR, ca), (CERT_VAR, ca)]))
            .unwrap_err()
            .to_string();
        assert!(e.contains(KEY_VAR) && e.contains("is not set"), "{e}");
        let e = TlsFiles::from_vars(&vars(&[(DIR_VAR, "/nonexistent-tandem-tls")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("does not exist") && e.contains("tandem certs init"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_kubernetes_secret_carries_the_three_files() {
        let dir = temp("k8s");
        init(&dir, None, "job", &["*.default.svc".into()], 1).unwrap();
        let y = kubernetes_secret(&dir, "tandem-tls", Some("ml")).unwrap();
        assert!(
            y.contains("kind: Secret") && y.contains("  namespace: ml\n"),
            "{y}"
        );
        let line = |k: &str| {
            y.lines()
                .find_map(|l| l.trim().strip_prefix(&format!("{k}: ")))
                .unwrap()
                .to_string()
        };
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(line(CERT_FILE))
            .unwrap();
        assert_eq!(decoded, std::fs::read(dir.join(CERT_FILE)).unwrap());
        assert!(!y.contains("ca-key"), "the CA's key stays out");
        assert!(
            !kubernetes_secret(&dir, "x", None)
                .unwrap()
                .contains("namespace")
        );
        for bad in ["", "Upper", "a_b"] {
            assert!(kubernetes_secret(&dir, bad, None).is_err(), "{bad:?}");
        }
        assert!(kubernetes_secret(&dir, "ok", Some("Bad")).is_err());
        assert!(
            kubernetes_secret(&temp("missing"), "ok", None)
                .unwrap_err()
                .to_string()
                .contains("reading")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
