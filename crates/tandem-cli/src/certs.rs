//! `tandem certs`: a job's certificate authority and certificates, and the Kubernetes Secret that
//! carries them.

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
}

/// Runs `tandem certs ...`.
pub fn certs(cmd: CertsCommand) -> Result<ExitCode> {
    match cmd {
        CertsCommand::Init(a) => {
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
            let made =
                tandem_tls::init_as(&a.dir, Some(&folder), &a.job, identity, &names, a.days)?;
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
        CertsCommand::Check(a) => {
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

/// Whether `a` and `b` name the same folder (as given, or once both exist).
fn same_folder(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a.components().eq(b.components()),
    }
}
