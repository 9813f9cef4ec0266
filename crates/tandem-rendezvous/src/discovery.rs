//! Finding the rendezvous of an MPI job started with nothing but the job token (`mpirun -np N -x
//! TANDEM_JOB_TOKEN prog`): Open MPI says who each process is but not where rank 0 listens. Rank 0
//! then binds the rendezvous on an ephemeral port and publishes its address in a file named after
//! the MPI job id, in a directory every process can read (`TANDEM_RENDEZVOUS_DIR`, default the
//! working directory, which mpirun gives every rank and clusters share across nodes), like
//! torch's `file://` initialisation; the others wait for the file. The file is removed when rank 0
//! leaves.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tandem_core::cluster::{ClusterSpec, Convention};
use tandem_core::{Error, Result};

/// The directory of the rendezvous files.
pub const DIR_VAR: &str = tandem_core::settings::RENDEZVOUS_DIR.name;

/// Variables that carry an MPI job's id, in the order they are tried.
const JOB_ID_VARS: [&str; 2] = ["OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE"];

/// Where the rendezvous of the job `spec` describes is published, when its launcher names no
/// rendezvous but an MPI job id: `None` otherwise.
pub fn job_file(spec: &ClusterSpec, var: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if spec.rendezvous().is_some()
        || !matches!(spec.source(), Convention::OpenMpi | Convention::Pmi)
    {
        return None;
    }
    let id = JOB_ID_VARS.iter().find_map(|v| var(v))?;
    let id: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect();
    if id.is_empty() {
        return None;
    }
    let dir = var(DIR_VAR)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::current_dir().ok())?;
    Some(dir.join(format!(".tandem-rendezvous-{id}")))
}

/// Where rank 0 binds when nothing says: loopback when every rank runs on this machine, else the
/// address of the interface that routes to mpirun's host (Open MPI's `OMPI_MCA_orte_hnp_uri`), or
/// this machine's name.
pub fn bind_address(spec: &ClusterSpec, var: impl Fn(&str) -> Option<String>) -> Result<String> {
    if spec.local_world_size() >= spec.world_size() {
        return Ok("127.0.0.1:0".into());
    }
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let launcher: Vec<String> = var("OMPI_MCA_orte_hnp_uri")
        .and_then(|uri| {
            uri.split(';')
                .find_map(|p| p.strip_prefix("tcp://"))
                .map(|a| a.split(',').next().unwrap_or(a).to_string())
        })
        .into_iter()
        .collect();
    // The address check wants a real port; the host is what matters here.
    let own = tandem_core::cluster::listen_address(&format!("{name}:1"), &launcher)?;
    let host = own.rsplit_once(':').map_or(own.as_str(), |(h, _)| h);
    Ok(format!("{host}:0"))
}

/// Publishes `addr` in `file` atomically (a temporary file renamed into place).
pub fn publish(file: &Path, addr: &str) -> Result<()> {
    let tmp = file.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, format!("{addr}\n")).map_err(|e| {
        Error::io(
            format!("writing the rendezvous address to {}", tmp.display()),
            e,
        )
    })?;
    std::fs::rename(&tmp, file).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(
            format!("publishing the rendezvous address in {}", file.display()),
            e,
        )
    })
}

/// Waits (polling, up to `deadline`) for rank 0 to publish the rendezvous address in `file`.
pub async fn wait_for(file: &Path, deadline: Duration) -> Result<String> {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(file) {
            let addr = text.trim();
            if !addr.is_empty() {
                tandem_core::cluster::check_address(&file.display().to_string(), addr)?;
                return Ok(addr.to_string());
            }
        }
        if start.elapsed() >= deadline {
            return Err(Error::timeout(
                format!(
                    "rank 0 to publish the rendezvous address in {} (every rank must see that directory: set {DIR_VAR} to one all nodes share, or name the rendezvous with TANDEM_RENDEZVOUS_ADDR)",
                    file.display()
                ),
                deadline,
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(vars: &[(&str, &str)]) -> ClusterSpec {
        ClusterSpec::from_vars(vars).expect("spec")
    }

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn an_mpi_job_without_a_rendezvous_publishes_it_in_a_file_named_after_its_job_id() {
        let vars = [
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "3"),
            ("OMPI_MCA_ess_base_jobid", "1605894145"),
            (DIR_VAR, "/shared/jobs"),
        ];
        let s = spec(&vars);
        assert_eq!(
            job_file(&s, lookup(&vars)),
            Some(PathBuf::from("/shared/jobs/.tandem-rendezvous-1605894145"))
        );
        // PMIx's namespace when Open MPI's job id is missing; odd characters made safe.
        let vars = [
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "3"),
            ("PMIX_NAMESPACE", "slurm/pmix 7"),
            (DIR_VAR, "/d"),
        ];
        assert_eq!(
            job_file(&spec(&vars), lookup(&vars)),
            Some(PathBuf::from("/d/.tandem-rendezvous-slurm_pmix_7"))
        );
        // A rendezvous named, no job id, or another launcher: no file.
        let named = [
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "3"),
            ("OMPI_MCA_ess_base_jobid", "5"),
            ("MASTER_ADDR", "node1"),
            ("MASTER_PORT", "2222"),
        ];
        assert_eq!(job_file(&spec(&named), lookup(&named)), None);
        let no_id = [("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "3")];
        assert_eq!(job_file(&spec(&no_id), lookup(&no_id)), None);
        let tandem = [
            ("TANDEM_RANK", "1"),
            ("TANDEM_WORLD_SIZE", "3"),
            ("OMPI_MCA_ess_base_jobid", "5"),
        ];
        assert_eq!(job_file(&spec(&tandem), lookup(&tandem)), None);
    }

    #[test]
    fn rank_0_binds_loopback_when_every_rank_is_on_its_machine() {
        let one_node = [
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "3"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "3"),
        ];
        let s = spec(&one_node);
        assert_eq!(
            bind_address(&s, lookup(&one_node)).expect("bind"),
            "127.0.0.1:0"
        );
        let two_nodes = [
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            (
                "OMPI_MCA_orte_hnp_uri",
                "1.0;tcp://127.0.0.1:36567;tcp6://[::1]:1",
            ),
        ];
        let got = bind_address(&spec(&two_nodes), lookup(&two_nodes)).expect("bind");
        assert!(got.ends_with(":0"), "{got}");
    }

    #[tokio::test]
    async fn the_others_read_the_published_address_or_time_out_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("tandem-discovery-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join(".tandem-rendezvous-42");
        let e = wait_for(&file, Duration::from_millis(120))
            .await
            .expect_err("no file yet");
        let msg = e.to_string();
        assert!(
            msg.contains(".tandem-rendezvous-42") && msg.contains(DIR_VAR),
            "{msg}"
        );
        publish(&file, "127.0.0.1:4567").expect("publish");
        assert_eq!(
            wait_for(&file, Duration::from_secs(1)).await.expect("read"),
            "127.0.0.1:4567"
        );
        std::fs::write(&file, "not an address\n").expect("write");
        assert!(wait_for(&file, Duration::from_secs(1)).await.is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
