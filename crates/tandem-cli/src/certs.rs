//! `tandem certs`: a job's certificate authority and certificates, and the Kubernetes Secret that
//! carries them.
//!
//! Why certificates per process: every connection of a job is mutual TLS unless plaintext is
//! asked for, and a certificate whose common name is the process's identity (`rank-3`, `ps-0`,
//! `worker-1`) lets its peers check who they talk to, not only which job. `init` makes the job's CA
//! once (reused afterwards, never overwritten) and one process's certificate; `check` loads a folder
//! as a process would and says who it is; `kubernetes` prints a Secret per replica type.
//!
//! The usual sequence for a job across machines:
//!
//! ```text
//! tandem certs init tls/ --name host-1.example --name 10.0.0.1       # the CA and one process's files
//! tandem certs init tls/ --out tls/rank-3 --identity rank-3 --name host-2.example
//! tandem certs check tls/rank-3                                      # who this folder makes a process
//! tandem certs kubernetes tls/ --job train --replicas ps=2 --replicas worker=4 > secrets.yaml
//! ```
//!
//! Each process points `TANDEM_TLS_DIR` at its folder (`ca.pem`, `cert.pem`, `key.pem`); the CA's
//! key never leaves the CA's folder, and nothing already written is replaced.

use crate::ExitCode;
use std::path::PathBuf;

use tandem::Result;

/// What `tandem certs` does.
#[derive(clap::Subcommand, Debug)]
pub enum CertsCommand {
    /// Make the job's CA in DIR (ca.pem, ca-key.pem; an existing one is used, never replaced) and
    /// a certificate for the names given in its own folder (cert.pem, key.pem and a copy of ca.pem;
    /// --out, default DIR/IDENTITY or DIR/process). Point TANDEM_TLS_DIR at that folder, never at
    /// DIR: the CA's key stays apart.
    Init(InitArgs),
    /// Print a Kubernetes Secret holding DIR's ca.pem, cert.pem and key.pem (not the CA's key).
    Kubernetes(KubernetesArgs),
    /// Check the certificates this process would use (DIR, or TANDEM_TLS_DIR / TANDEM_TLS_CA,
    /// TANDEM_TLS_CERT, TANDEM_TLS_KEY): the key fits, the certificate chains to the CA and is
    /// valid now. Prints what connections would be: TLS, or plaintext and where it is allowed.
    Check(CheckArgs),
}

/// Arguments of `tandem certs check`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// A folder with ca.pem, cert.pem and key.pem (default: what the environment names).
    dir: Option<PathBuf>,
}

/// Arguments of `tandem certs init`.
#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// The folder of the job's CA.
    dir: PathBuf,
    /// A name the certificate's holder is reached by (DNS name, `*.` wildcard or IP address);
    /// repeat for several. Default: localhost and 127.0.0.1.
    #[arg(long = "name", value_name = "NAME")]
    names: Vec<String>,
    /// Where to write cert.pem and key.pem (and a copy of ca.pem): the folder a process's
    /// TANDEM_TLS_DIR names (default: DIR/IDENTITY, or DIR/process without --identity). It may not
    /// be DIR itself: the CA's key must not lie where processes read their files.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The job's name, in the CA's and the certificate's subject.
    #[arg(long, env = "TANDEM_JOB_NAME", default_value = "tandem")]
    job: String,
    /// Days of validity (1 to 3650).
    #[arg(long, default_value_t = 30)]
    days: u32,
    /// The process's identity: `rank-N`, `worker-N`, `ps-N`, `chief` or `rendezvous` makes its
    /// certificate for that role of the job (its key usage, and peers checked for their role);
    /// anything else is only a common name (default: the job's name; no role).
    #[arg(long)]
    identity: Option<String>,
}

/// Arguments of `tandem certs kubernetes`.
#[derive(clap::Args, Debug)]
pub struct KubernetesArgs {
    /// The folder with ca.pem, cert.pem and key.pem.
    dir: PathBuf,
    /// The Secret's name (default: `<job>-tls`: one per job, so jobs of one namespace never
    /// share a CA).
    #[arg(long)]
    name: Option<String>,
    /// The job's name (the manifests in deploy/kubernetes mount `<job>-tls`).
    #[arg(long, env = "TANDEM_JOB_NAME", default_value = "tandem")]
    job: String,
    /// Its namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// A certificate per process of a Kubeflow job instead: `TYPE=COUNT` for each replica type
    /// (repeat: `--replicas ps=2 --replicas worker=4`). DIR is then the job's CA folder (from
    /// `tandem certs init DIR --job JOB`), and one Secret per type is printed, `<job>-tls-<type>`,
    /// holding ca.pem and `<type>-<index>-cert.pem` / `-key.pem` for each replica: a pod mounts
    /// its type's only, so a worker holds no parameter server's key.
    #[arg(long = "replicas", value_name = "TYPE=COUNT")]
    replicas: Vec<String>,
    /// The job's kind, which decides each replica's identity: `tfjob` (`ps` is ps-N, `worker`
    /// worker-N, `chief` chief) or `pytorchjob` (`master` is rank-0, `worker` N is rank-(N+1)).
    #[arg(long, default_value = "tfjob", value_parser = ["tfjob", "pytorchjob"])]
    kind: String,
    /// Days of validity of the replicas' certificates (1 to 3650).
    #[arg(long, default_value_t = 30)]
    days: u32,
}

/// Runs `tandem certs ...`.
pub fn certs(cmd: CertsCommand) -> Result<ExitCode> {
    match cmd {
        CertsCommand::Init(a) => init(a),
        CertsCommand::Check(a) => check(a),
        CertsCommand::Kubernetes(a) if !a.replicas.is_empty() => {
            print!("{}", replica_secrets(&a)?);
            Ok(ExitCode::SUCCESS)
        }
        CertsCommand::Kubernetes(a) => {
            print!(
                "{}",
                tandem_tls::kubernetes_secret(
                    &a.dir,
                    &a.name.unwrap_or_else(|| format!("{}-tls", a.job)),
                    a.namespace.as_deref()
                )?
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `tandem certs init`.
fn init(a: InitArgs) -> Result<ExitCode> {
    let names = if a.names.is_empty() {
        vec!["localhost".to_string(), "127.0.0.1".to_string()]
    } else {
        a.names
    };
    let identity = a.identity.as_deref().unwrap_or(&a.job);
    let folder = a
        .out
        .clone()
        .unwrap_or_else(|| a.dir.join(a.identity.as_deref().unwrap_or("process")));
    if same_folder(&folder, &a.dir) {
        return Err(tandem::Error::invalid(
            "--out",
            format!(
                "{} is the CA's folder: its key must not lie where a process reads its \
                 files; give the certificate a folder of its own",
                folder.display()
            ),
        ));
    }
    let made = tandem_tls::init_as(&a.dir, Some(&folder), &a.job, identity, &names, a.days)?;
    if made.new_authority {
        println!(
            "new CA for job {} in {} (its key stays there: keep it off the processes' hosts)",
            a.job,
            a.dir.display()
        );
    } else {
        println!(
            "reusing the CA already in {} (nothing of it replaced)",
            a.dir.display()
        );
    }
    for f in &made.written {
        println!("wrote {}", f.display());
    }
    println!(
        "certificate for {} (valid {} days); processes use it with {}={}",
        names.join(", "),
        a.days,
        tandem_tls::DIR_VAR,
        folder.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `tandem certs check`.
fn check(a: CheckArgs) -> Result<ExitCode> {
    let security = match &a.dir {
        Some(d) => {
            let files = tandem_tls::TlsFiles {
                ca: d.join(tandem_tls::CA_FILE),
                cert: d.join(tandem_tls::CERT_FILE),
                key: d.join(tandem_tls::KEY_FILE),
            };
            tandem_tls::Security::tls(tandem_tls::TlsContext::load(&files)?)
        }
        None => tandem_tls::Security::from_env()?,
    };
    match security {
        tandem_tls::Security::Tls(ctx) => {
            println!(
                "TLS ok: certificate of {:?}, valid, from the job's CA",
                ctx.name()
            );
            match ctx.identity() {
                Some(id) => {
                    println!("identity: {id} (peers are checked for their job and role)")
                }
                None => println!(
                    "no identity (a certificate without a role: peers are checked \
                     against the CA only)"
                ),
            }
        }
        tandem_tls::Security::Plaintext { insecure: true } => println!(
            "plaintext everywhere ({}=1): nothing is encrypted",
            tandem_tls::INSECURE_VAR
        ),
        tandem_tls::Security::Plaintext { insecure: false } => println!(
            "no certificates: plaintext to loopback addresses only; a job across hosts \
             needs {} (make them with `tandem certs init DIR`)",
            tandem_tls::DIR_VAR
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// The identity of replica `index` of `kind`'s replica type `ty`, or why there is none.
fn replica_identity(kind: &str, ty: &str, index: usize) -> Option<String> {
    match (kind, ty) {
        ("tfjob", "ps" | "worker") => Some(format!("{ty}-{index}")),
        ("tfjob", "chief") | ("pytorchjob", "master") => {
            (index == 0).then(|| if ty == "chief" { "chief" } else { "rank-0" }.to_string())
        }
        ("pytorchjob", "worker") => Some(format!("rank-{}", index + 1)),
        _ => None,
    }
}

/// Parses `TYPE=COUNT` of `--replicas` for `kind`.
fn parse_replicas(kind: &str, spec: &str) -> Result<(String, usize)> {
    let bad = |why: String| tandem::Error::invalid("--replicas", format!("{spec:?}: {why}"));
    let (ty, count) = spec
        .split_once('=')
        .ok_or_else(|| bad("give TYPE=COUNT, e.g. worker=4".into()))?;
    let count: usize = count
        .parse()
        .ok()
        .filter(|c| (1..=1024).contains(c))
        .ok_or_else(|| bad("the count is a number from 1 to 1024".into()))?;
    if replica_identity(kind, ty, 0).is_none() {
        let types = if kind == "tfjob" {
            "ps, worker, chief"
        } else {
            "master, worker"
        };
        return Err(bad(format!(
            "a {kind} has no replica type {ty:?} ({types})"
        )));
    }
    if replica_identity(kind, ty, count - 1).is_none() {
        return Err(bad(format!("a {kind} has one {ty}")));
    }
    Ok((ty.to_string(), count))
}

/// `tandem certs kubernetes DIR --replicas ...`: a Secret per replica type with a certificate per
/// replica, issued by the CA in DIR.
fn replica_secrets(a: &KubernetesArgs) -> Result<String> {
    let types = a
        .replicas
        .iter()
        .map(|r| parse_replicas(&a.kind, r))
        .collect::<Result<Vec<_>>>()?;
    if !a.dir.join(tandem_tls::CA_KEY_FILE).exists() {
        return Err(tandem::Error::invalid(
            "DIR",
            format!(
                "{} holds no CA key ({}): make the job's CA with `tandem certs init {} --job {}`",
                a.dir.display(),
                tandem_tls::CA_KEY_FILE,
                a.dir.display(),
                a.job
            ),
        ));
    }
    let ca = std::fs::read_to_string(a.dir.join(tandem_tls::CA_FILE))
        .map_err(|e| tandem::Error::io(format!("reading {}", a.dir.display()), e))?;
    let names = ["localhost".to_string()];
    let mut out = String::new();
    for (ty, count) in types {
        let mut files = vec![(tandem_tls::CA_FILE.to_string(), ca.clone())];
        for i in 0..count {
            let identity = replica_identity(&a.kind, &ty, i).unwrap_or_default();
            let tmp =
                std::env::temp_dir().join(format!("tandem-certs-{}-{ty}-{i}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            let issued = tandem_tls::init_as(&a.dir, Some(&tmp), &a.job, &identity, &names, a.days);
            let read = |f: &str| {
                std::fs::read_to_string(tmp.join(f))
                    .map_err(|e| tandem::Error::io(format!("reading {identity}'s {f}"), e))
            };
            let files_of = issued
                .and_then(|_| Ok((read(tandem_tls::CERT_FILE)?, read(tandem_tls::KEY_FILE)?)));
            let _ = std::fs::remove_dir_all(&tmp);
            let (cert, key) = files_of?;
            files.push((format!("{ty}-{i}-cert.pem"), cert));
            files.push((format!("{ty}-{i}-key.pem"), key));
        }
        out.push_str(&tandem_tls::secret_yaml(
            &format!(
                "The certificates of job {}'s {ty} replicas, one per replica index; mount it in                  the {ty} pods only.",
                a.job
            ),
            &format!("{}-tls-{ty}", a.job),
            a.namespace.as_deref(),
            &files,
        )?);
        out.push_str("---\n");
    }
    Ok(out)
}

/// Whether `a` and `b` name the same folder (as given, or once both exist).
fn same_folder(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a.components().eq(b.components()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_counts_and_types_are_checked_on_both_sides() {
        for (kind, spec, ok) in [
            ("tfjob", "worker=1", true),
            ("tfjob", "worker=1024", true),
            ("tfjob", "worker=0", false),
            ("tfjob", "worker=1025", false),
            ("tfjob", "worker", false),
            ("tfjob", "worker=x", false),
            ("tfjob", "chief=1", true),
            ("tfjob", "chief=2", false),
            ("tfjob", "master=1", false),
            ("pytorchjob", "master=1", true),
            ("pytorchjob", "master=2", false),
            ("pytorchjob", "ps=1", false),
        ] {
            let got = parse_replicas(kind, spec);
            assert_eq!(got.is_ok(), ok, "{kind} {spec}: {got:?}");
            if let Err(e) = got {
                assert!(e.to_string().contains("--replicas"), "{e}");
            }
        }
    }

    #[test]
    fn each_replica_has_the_identity_of_its_role() {
        assert_eq!(replica_identity("tfjob", "ps", 1).as_deref(), Some("ps-1"));
        assert_eq!(
            replica_identity("tfjob", "worker", 0).as_deref(),
            Some("worker-0")
        );
        assert_eq!(
            replica_identity("tfjob", "chief", 0).as_deref(),
            Some("chief")
        );
        assert_eq!(
            replica_identity("pytorchjob", "master", 0).as_deref(),
            Some("rank-0")
        );
        assert_eq!(
            replica_identity("pytorchjob", "worker", 2).as_deref(),
            Some("rank-3")
        );
        assert_eq!(replica_identity("tfjob", "chief", 1), None);
    }
}
