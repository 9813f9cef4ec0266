//! `tandem topo`: the GPU interconnect, and the GPUs and ring a job of N would get.
//!
//! Why: a ring is as fast as its slowest link, and on machines whose NVLinks do not join every pair
//! of GPUs the choice of GPUs for a smaller job matters. This prints the matrix (`nvidia-smi topo
//! -m`, or a recorded one with `--from-file` where the tool is missing), the GPUs a job of N would
//! get, their ring order and its bottleneck: what `tandem launch --gpus auto` would choose.
//!
//! For a recorded matrix of four GPUs joined in NVLink pairs (`tandem topo --from-file
//! crates/tandem-topology/fixtures/pairs4.txt --gpus 3`):
//!
//! ```text
//!         GPU0  GPU1  GPU2  GPU3  NUMA
//! GPU0       X   PHB   NV4   PHB     0
//! GPU1     PHB     X   PHB   NV4     0
//! GPU2     NV4   PHB     X   PHB     0
//! GPU3     PHB   NV4   PHB     X     0
//!
//! for 3 GPU(s): GPU0, GPU1, GPU2
//! ring: GPU0 =PHB=> GPU1 =PHB=> GPU2 =NV4=> GPU0
//! bottleneck: GPU0 -> GPU1 over PHB (about 18 GB/s each way)
//! ```
//!
//! Three GPUs cannot avoid a PCIe hop on this machine; with `--gpus 2` the answer is one NVLink
//! pair, at NVLink's speed. The last line says how to launch with that choice: local rank r gets
//! the r-th GPU of the list as its `CUDA_VISIBLE_DEVICES`.

use crate::ExitCode;
use std::path::PathBuf;

use clap::Args;
use tandem::{Error, Result};
use tandem_topology::{Topology, choose};

/// Arguments of `tandem topo`.
#[derive(Args, Debug)]
pub struct TopoArgs {
    /// Read the matrix from this file (the output of `nvidia-smi topo -m`) instead of running it.
    #[arg(long)]
    from_file: Option<PathBuf>,
    /// How many GPUs the job needs (default: all).
    #[arg(long)]
    gpus: Option<usize>,
}

/// Prints the matrix, the chosen GPUs and ring, and the expected bottleneck link.
pub fn topo(args: TopoArgs) -> Result<ExitCode> {
    let topo = match &args.from_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            Topology::parse(&text)?
        }
        None => Topology::discover()?,
    };
    let k = args.gpus.unwrap_or(topo.gpus.len());
    print!("{}", topo.matrix());
    let plan = choose(&topo, k)?;
    let ring: Vec<String> = plan.ring.iter().map(|g| format!("GPU{g}")).collect();
    println!("\nfor {k} GPU(s): {}", ring.join(", "));
    if k > 1 {
        let steps: Vec<String> = plan
            .ring
            .iter()
            .zip(&plan.steps)
            .map(|(g, l)| format!("GPU{g} ={l}=>"))
            .collect();
        println!("ring: {} GPU{}", steps.join(" "), plan.ring[0]);
        let (a, b, link) = plan.bottleneck;
        println!(
            "bottleneck: GPU{a} -> GPU{b} over {link} (about {:.0} GB/s each way)",
            link.gbps()
        );
    }
    let devices: Vec<String> = plan.ring.iter().map(|g| g.to_string()).collect();
    println!(
        "tandem launch --gpus {} gives local rank r CUDA_VISIBLE_DEVICES=<r-th of that list>",
        devices.join(",")
    );
    Ok(ExitCode::SUCCESS)
}
