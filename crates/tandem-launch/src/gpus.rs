//! Which GPU each training process of a local job gets (`--gpus`).

use tandem_core::{Error, Result};
use tandem_topology::{Topology, choose};

use crate::plan::Layout;

/// How many processes of the layout train (and may each get a GPU): every rank, or the workers
/// and the chief of a parameter-server job.
fn trainers(layout: &Layout) -> usize {
    match *layout {
        Layout::Allreduce { nproc } => nproc,
        Layout::Ps { workers, .. } => workers,
    }
}

/// Where `--gpus auto` reads the interconnect matrix instead of running `nvidia-smi topo -m` (a
/// recorded matrix, for containers without the tool and for tests).
pub const TOPOLOGY_FILE_VAR: &str = tandem_core::settings::TOPOLOGY_FILE.name;

/// Resolves `--gpus`: `none` → no assignment; a list such as `0,2` → that ring order; `auto` → the
/// fastest ring of this machine's GPUs from `nvidia-smi topo -m` (or the file named by
/// `TANDEM_TOPOLOGY_FILE`); no assignment without GPUs.
pub fn assign(arg: &str, layout: &Layout) -> Result<Vec<usize>> {
    match arg.trim() {
        "none" | "" => Ok(Vec::new()),
        "auto" => {
            let topo = match std::env::var(TOPOLOGY_FILE_VAR) {
                Ok(path) => {
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| Error::io(format!("reading {TOPOLOGY_FILE_VAR}={path}"), e))?;
                    Topology::parse(&text)?
                }
                Err(_) => match Topology::discover() {
                    Ok(t) => t,
                    // No nvidia-smi: no driver, no GPUs, nothing to choose.
                    Err(Error::Io { .. }) => return Ok(Vec::new()),
                    Err(e) => {
                        // The driver is there but its matrix is unreadable: say so, and leave the
                        // GPUs to the driver's order rather than stop the job.
                        eprintln!("tandem launch: {e}; GPUs are left in the driver's order");
                        return Ok(Vec::new());
                    }
                },
            };
            let want = trainers(layout).min(topo.gpus.len());
            if want == 0 {
                return Ok(Vec::new());
            }
            let plan = choose(&topo, want)?;
            let ring: Vec<String> = plan.ring.iter().map(|g| g.to_string()).collect();
            eprintln!(
                "tandem launch: GPUs {} in ring order (slowest step GPU{}→GPU{} over {})",
                ring.join(","),
                plan.bottleneck.0,
                plan.bottleneck.1,
                plan.bottleneck.2
            );
            if trainers(layout) > topo.gpus.len() {
                eprintln!(
                    "tandem launch: {} training processes share {} GPUs",
                    trainers(layout),
                    topo.gpus.len()
                );
            }
            Ok(plan.ring)
        }
        list => list
            .split(',')
            .map(|g| {
                g.trim().parse::<usize>().map_err(|_| {
                    Error::invalid(
                        "--gpus",
                        format!("{list:?} is not auto, none or a list such as 0,2"),
                    )
                })
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_none_parse() {
        let l = Layout::Allreduce { nproc: 2 };
        assert_eq!(assign("0, 2", &l).unwrap(), [0, 2]);
        assert!(assign("none", &l).unwrap().is_empty());
        assert!(
            assign("0,x", &l)
                .unwrap_err()
                .to_string()
                .contains("--gpus")
        );
    }
}
