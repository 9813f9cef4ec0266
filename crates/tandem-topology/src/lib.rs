//! Which GPUs a job should use, and in which ring order, from how they are connected.
//!
//! [`Topology::parse`] reads the matrix `nvidia-smi topo -m` prints (`NV#` for a bonded set of #
//! NVLinks, `PIX`, `PXB`, `PHB`, `NODE`, `SYS` for PCIe paths of growing length) and each GPU's NUMA
//! node. [`choose`] picks the subset of GPUs and the ring order that maximise the slowest link of the
//! ring (a ring allreduce runs at the speed of its slowest step), then the total; so on a machine of
//! NVLink pairs a 2-GPU job gets a linked pair, not two GPUs across the PCIe root complex.
//!
//! ```
//! use tandem_topology::{Link, Topology, choose};
//! let text = "\tGPU0\tGPU1\tGPU2\tCPU Affinity\tNUMA Affinity\n\
//!             GPU0\t X \tPHB\tNV4\t0-15\t0\n\
//!             GPU1\tPHB\t X \tPHB\t0-15\t0\n\
//!             GPU2\tNV4\tPHB\t X \t0-15\t0\n";
//! let topo = Topology::parse(text).unwrap();
//! let plan = choose(&topo, 2).unwrap();
//! assert_eq!(plan.ring, vec![0, 2]);
//! assert_eq!(plan.bottleneck.2, Link::NvLink(4));
//! ```
//!
//! Why choose by the slowest link: a ring moves every byte over every link in turn, so its speed is
//! that of its slowest hop; two rings of equal bottleneck are told apart by their total bandwidth,
//! then by how many hops cross NUMA nodes (a crossing adds a hop through the CPUs' interconnect).
//! Small jobs are searched exhaustively; beyond a bound, a greedy ring is grown from each start
//! and improved by 2-opt reversals.
//!
//! Why not leave it to NCCL: NCCL finds the best ring among the GPUs it is given, but which GPUs a
//! job of fewer ranks than the machine has gets is the launcher's choice, and on a machine whose
//! NVLinks do not join every pair a bad choice halves the bandwidth. `tandem topo` shows the
//! choice before a job runs; `tandem launch --gpus auto` makes it.
//!
//! The search is deterministic (ties go to lower GPU indices), so every launch of the same job on
//! the same machine gets the same GPUs.
//!
//! What it needs is text: the matrix `nvidia-smi topo -m` prints (or a recorded copy), and no
//! CUDA library, so the choice can be made and tested on machines without GPUs.

use std::fmt;
use std::process::Command;

use tandem_core::{Error, Result};

/// `text` without ANSI control sequences (`ESC [ ... final`, e.g. the underline `\u{1b}[4m` that
/// driver 580's `nvidia-smi topo -m` wraps the header in). A lone `ESC` followed by anything else
/// is dropped with that one character. (Ten lines; not worth a dependency.)
fn without_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
        } else if chars.next() == Some('[') {
            // Parameters and intermediates run until the final byte, '@'..='~'.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// Where a matrix came from, for error messages.
const SOURCE: &str = "nvidia-smi topo -m";

/// How two GPUs are connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Link {
    /// The GPU itself.
    SelfLink,
    /// A bonded set of this many NVLinks (`NV#`).
    NvLink(u32),
    /// At most one PCIe bridge (`PIX`).
    Pix,
    /// Several PCIe bridges, no host bridge (`PXB`).
    Pxb,
    /// Through a PCIe host bridge, typically the CPU (`PHB`).
    Phb,
    /// Between host bridges within one NUMA node (`NODE`).
    Node,
    /// Across the SMP interconnect between NUMA nodes (`SYS`).
    Sys,
}

impl Link {
    /// Parses one cell of the matrix.
    pub fn parse(cell: &str) -> Option<Link> {
        let c = cell.trim();
        Some(match c {
            "X" => Link::SelfLink,
            "PIX" => Link::Pix,
            "PXB" => Link::Pxb,
            "PHB" => Link::Phb,
            "NODE" => Link::Node,
            "SYS" | "SOC" => Link::Sys,
            _ => {
                let n: u32 = c.strip_prefix("NV")?.parse().ok()?;
                if n == 0 {
                    return None;
                }
                Link::NvLink(n)
            }
        })
    }

    /// A rough one-direction bandwidth in GB/s, used only to rank links: 25 GB/s per NVLink (NVLink 3
    /// and 4 per link), and PCIe 4.0 x16 paths derated by how many bridges and hops they cross.
    pub fn gbps(self) -> f64 {
        match self {
            Link::SelfLink => f64::INFINITY,
            Link::NvLink(n) => 25.0 * f64::from(n),
            Link::Pix => 24.0,
            Link::Pxb => 22.0,
            Link::Phb => 18.0,
            Link::Node => 15.0,
            Link::Sys => 10.0,
        }
    }

    /// Whether this link is NVLink.
    pub fn is_nvlink(self) -> bool {
        matches!(self, Link::NvLink(_))
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Link::SelfLink => f.write_str("X"),
            Link::NvLink(n) => write!(f, "NV{n}"),
            Link::Pix => f.write_str("PIX"),
            Link::Pxb => f.write_str("PXB"),
            Link::Phb => f.write_str("PHB"),
            Link::Node => f.write_str("NODE"),
            Link::Sys => f.write_str("SYS"),
        }
    }
}

/// One GPU of the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// Its index (`GPU3` → 3), as `CUDA_VISIBLE_DEVICES` names it.
    pub index: usize,
    /// The CPUs close to it, as printed (e.g. `0-19,40-59`).
    pub cpu_affinity: Option<String>,
    /// Its NUMA node, when known.
    pub numa: Option<u32>,
}

/// The GPUs of a machine and the link between every pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The GPUs, in index order.
    pub gpus: Vec<Gpu>,
    /// `links[i][j]`: how GPU i reaches GPU j.
    pub links: Vec<Vec<Link>>,
}

impl Topology {
    /// Runs `nvidia-smi topo -m` and parses its output.
    pub fn discover() -> Result<Topology> {
        let out = Command::new("nvidia-smi")
            .args(["topo", "-m"])
            .output()
            .map_err(|e| {
                Error::io(
                    "running nvidia-smi topo -m (is the NVIDIA driver installed?)",
                    e,
                )
            })?;
        if !out.status.success() {
            return Err(Error::config(
                SOURCE,
                format!(
                    "nvidia-smi exited with {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        Self::parse(&String::from_utf8_lossy(&out.stdout))
    }

    /// Parses the matrix `nvidia-smi topo -m` prints (tab-separated; NIC rows and columns and the
    /// legend are ignored, and so are the terminal escape sequences recent drivers put around the
    /// header even when the output is not a terminal).
    pub fn parse(text: &str) -> Result<Topology> {
        let text = without_escapes(text);
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let header = lines
            .next()
            .ok_or_else(|| Error::config(SOURCE, "the output is empty"))?;
        let (devices, gpu_columns) = header_columns(header)?;
        let n = gpu_columns.len();
        let mut gpus = Vec::with_capacity(n);
        let mut links = Vec::with_capacity(n);
        for line in lines {
            let cells: Vec<&str> = line.split('\t').collect();
            let name = cells.first().map(|c| c.trim()).unwrap_or("");
            if name.starts_with("Legend") {
                break;
            }
            let Some(row) = gpu_index(name) else {
                continue; // a NIC row
            };
            if row != gpus.len() {
                return Err(Error::config(
                    SOURCE,
                    format!("row {name} is out of order (expected GPU{})", gpus.len()),
                ));
            }
            let (gpu, row_links) = parse_row(name, row, &cells, devices, &gpu_columns)?;
            gpus.push(gpu);
            links.push(row_links);
        }
        if gpus.len() != n {
            return Err(Error::config(
                SOURCE,
                format!(
                    "the header names {n} GPUs but {} GPU rows follow",
                    gpus.len()
                ),
            ));
        }
        check_symmetric(&links)?;
        Ok(Topology { gpus, links })
    }

    /// The link matrix as `nvidia-smi` prints it (GPU rows and columns only).
    pub fn matrix(&self) -> String {
        let mut out = String::from("      ");
        for g in &self.gpus {
            out.push_str(&format!("{:>6}", format!("GPU{}", g.index)));
        }
        out.push_str("  NUMA\n");
        for (i, row) in self.links.iter().enumerate() {
            out.push_str(&format!("{:<6}", format!("GPU{i}")));
            for l in row {
                out.push_str(&format!("{:>6}", l.to_string()));
            }
            let numa = self.gpus[i]
                .numa
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into());
            out.push_str(&format!("  {numa:>4}\n"));
        }
        out
    }
}

/// The header's device columns (up to "CPU Affinity") and, for each GPU column, its position
/// among them and the GPU's index; the GPUs must be GPU0..GPUn in order.
fn header_columns(header: &str) -> Result<(usize, Vec<(usize, usize)>)> {
    let columns: Vec<&str> = header.split('\t').map(str::trim).collect();
    let devices: Vec<&str> = columns
        .iter()
        .skip(1)
        .take_while(|c| !c.eq_ignore_ascii_case("CPU Affinity") && !c.is_empty())
        .copied()
        .collect();
    let gpu_columns: Vec<(usize, usize)> = devices
        .iter()
        .enumerate()
        .filter_map(|(col, name)| gpu_index(name).map(|i| (col, i)))
        .collect();
    if gpu_columns.is_empty() {
        return Err(Error::config(
            SOURCE,
            format!("no GPU columns in the header line {header:?}"),
        ));
    }
    for (pos, &(_, idx)) in gpu_columns.iter().enumerate() {
        if idx != pos {
            return Err(Error::config(
                SOURCE,
                format!(
                    "GPU columns are not GPU0..GPU{} in order (column {pos} is GPU{idx})",
                    gpu_columns.len() - 1
                ),
            ));
        }
    }
    Ok((devices.len(), gpu_columns))
}

/// One GPU row: its links to every GPU (the diagonal, and only it, is `X`), its CPU affinity and
/// NUMA node.
fn parse_row(
    name: &str,
    row: usize,
    cells: &[&str],
    devices: usize,
    gpu_columns: &[(usize, usize)],
) -> Result<(Gpu, Vec<Link>)> {
    if cells.len() < 1 + devices {
        return Err(Error::config(
            SOURCE,
            format!(
                "row {name} has {} cells, the header names {devices} devices",
                cells.len() - 1
            ),
        ));
    }
    let mut row_links = Vec::with_capacity(gpu_columns.len());
    for &(col, j) in gpu_columns {
        let cell = cells[1 + col];
        let link = Link::parse(cell).ok_or_else(|| {
            Error::config(
                SOURCE,
                format!("row {name}, column GPU{j}: unknown link {:?}", cell.trim()),
            )
        })?;
        if (link == Link::SelfLink) != (row == j) {
            return Err(Error::config(
                SOURCE,
                format!(
                    "row {name}, column GPU{j}: {link} on the {}diagonal",
                    if row == j { "" } else { "off-" }
                ),
            ));
        }
        row_links.push(link);
    }
    let rest: Vec<&str> = cells[1 + devices..]
        .iter()
        .map(|c| c.trim())
        .filter(|c| !c.is_empty())
        .collect();
    let gpu = Gpu {
        index: row,
        cpu_affinity: rest.first().map(|s| s.to_string()),
        numa: rest.get(1).and_then(|s| s.parse().ok()),
    };
    Ok((gpu, row_links))
}

/// Every link is the same both ways.
fn check_symmetric(links: &[Vec<Link>]) -> Result<()> {
    for (i, row) in links.iter().enumerate() {
        for (j, link) in row.iter().enumerate().take(i) {
            if *link != links[j][i] {
                return Err(Error::config(
                    SOURCE,
                    format!(
                        "GPU{i}-GPU{j} is {} one way and {} the other",
                        links[i][j], links[j][i]
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The index of a `GPU<n>` column or row name.
fn gpu_index(name: &str) -> Option<usize> {
    name.trim().strip_prefix("GPU")?.parse().ok()
}

/// The GPUs a job should use, in ring order.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// GPU indices in ring order: local rank r uses `ring[r]`, and sends to `ring[r + 1]`.
    pub ring: Vec<usize>,
    /// The slowest step of the ring: (from GPU, to GPU, link). For one GPU, (g, g, SelfLink).
    pub bottleneck: (usize, usize, Link),
    /// Every step's link, in ring order.
    pub steps: Vec<Link>,
}

impl Plan {
    /// `CUDA_VISIBLE_DEVICES` for local rank `r`: its own GPU only.
    pub fn device_for(&self, local_rank: usize) -> Option<usize> {
        self.ring.get(local_rank).copied()
    }
}

/// Subsets tried exhaustively up to this many (n choose k) × (k−1)!/2 rings; larger machines are
/// searched greedily with a local improvement.
const EXHAUSTIVE_LIMIT: u64 = 200_000;

/// Chooses `k` GPUs and their ring order (see the crate docs).
pub fn choose(topo: &Topology, k: usize) -> Result<Plan> {
    let n = topo.gpus.len();
    if k == 0 || k > n {
        return Err(Error::invalid(
            "--gpus",
            format!("cannot choose {k} of this machine's {n} GPUs"),
        ));
    }
    let score = |ring: &[usize]| -> (f64, f64, i64) {
        let mut min = f64::INFINITY;
        let mut sum = 0.0;
        let mut numa_breaks = 0;
        for (i, &a) in ring.iter().enumerate() {
            let b = ring[(i + 1) % ring.len()];
            if ring.len() > 1 {
                let g = topo.links[a][b].gbps();
                min = min.min(g);
                sum += g;
            }
            if topo.gpus[a].numa != topo.gpus[b].numa {
                numa_breaks += 1;
            }
        }
        // Prefer: fastest slowest link, then most total bandwidth, then fewest NUMA crossings, then low indices.
        (min, sum, -numa_breaks)
    };
    let better = |a: &(f64, f64, i64), b: &(f64, f64, i64)| {
        (a.0, a.1, a.2).partial_cmp(&(b.0, b.1, b.2)) == Some(std::cmp::Ordering::Greater)
    };
    let combos = binomial(n as u64, k as u64).saturating_mul(factorial_half(k));
    let best = if combos <= EXHAUSTIVE_LIMIT {
        let mut best: Option<(Vec<usize>, (f64, f64, i64))> = None;
        for subset in subsets(n, k) {
            for ring in rings(&subset) {
                let s = score(&ring);
                if best.as_ref().is_none_or(|(_, b)| better(&s, b)) {
                    best = Some((ring, s));
                }
            }
        }
        best.map(|b| b.0)
    } else {
        greedy(topo, k, &score, &better)
    };
    let ring = best.ok_or_else(|| Error::invalid("--gpus", "no ring found"))?;
    Ok(Plan::around(topo, ring))
}

impl Plan {
    /// The plan of `ring` (non-empty): its links in order and its slowest one.
    fn around(topo: &Topology, ring: Vec<usize>) -> Plan {
        let steps: Vec<Link> = (0..ring.len())
            .map(|i| topo.links[ring[i]][ring[(i + 1) % ring.len()]])
            .collect();
        let bottleneck = (0..ring.len())
            .map(|i| (ring[i], ring[(i + 1) % ring.len()], steps[i]))
            .min_by(|x, y| x.2.gbps().total_cmp(&y.2.gbps()))
            .unwrap_or((ring[0], ring[0], Link::SelfLink));
        Plan {
            ring,
            bottleneck,
            steps,
        }
    }
}

/// n choose k, saturating.
fn binomial(n: u64, k: u64) -> u64 {
    (0..k).fold(1u64, |acc, i| acc.saturating_mul(n - i) / (i + 1))
}

/// The distinct rings through k GPUs: (k - 1)! / 2, saturating.
fn factorial_half(k: usize) -> u64 {
    if k < 3 {
        1
    } else {
        (3..k as u64).fold(1u64, |a, i| a.saturating_mul(i))
    }
}

/// Every k-subset of 0..n in lexicographic order.
fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut cur: Vec<usize> = (0..k).collect();
    loop {
        out.push(cur.clone());
        let Some(i) = (0..k).rev().find(|&i| cur[i] < n - k + i) else {
            return out;
        };
        cur[i] += 1;
        for j in i + 1..k {
            cur[j] = cur[j - 1] + 1;
        }
    }
}

/// Every ring through `set` starting at its first element (each direction once is enough, but both
/// are cheap to list).
fn rings(set: &[usize]) -> Vec<Vec<usize>> {
    let (first, rest) = match set.split_first() {
        Some(x) => x,
        None => return vec![],
    };
    let mut out = Vec::new();
    let mut rest = rest.to_vec();
    permute(&mut rest, 0, &mut |p| {
        let mut r = Vec::with_capacity(set.len());
        r.push(*first);
        r.extend_from_slice(p);
        out.push(r);
    });
    out
}

/// Calls `f` with every permutation of `v[at..]` (the prefix kept).
fn permute(v: &mut Vec<usize>, at: usize, f: &mut dyn FnMut(&[usize])) {
    if at + 1 >= v.len() {
        f(v);
        return;
    }
    for i in at..v.len() {
        v.swap(at, i);
        permute(v, at + 1, f);
        v.swap(at, i);
    }
}

/// A ring's score: slowest link, total bandwidth, minus NUMA crossings (bigger is better).
type Score = (f64, f64, i64);

/// Greedy for large machines: from every start, repeatedly add the GPU with the fastest link to the
/// ring's end, then improve by 2-opt reversals; keep the best.
fn greedy(
    topo: &Topology,
    k: usize,
    score: &dyn Fn(&[usize]) -> Score,
    better: &dyn Fn(&Score, &Score) -> bool,
) -> Option<Vec<usize>> {
    let n = topo.gpus.len();
    let mut best: Option<(Vec<usize>, Score)> = None;
    for start in 0..n {
        let mut ring = vec![start];
        while ring.len() < k {
            let last = ring[ring.len() - 1];
            let next = (0..n).filter(|g| !ring.contains(g)).max_by(|&a, &b| {
                topo.links[last][a]
                    .gbps()
                    .total_cmp(&topo.links[last][b].gbps())
            })?;
            ring.push(next);
        }
        let mut s = score(&ring);
        // 2-opt, bounded: at most k² passes.
        for _ in 0..k * k {
            let mut improved = false;
            for i in 1..k {
                for j in i + 1..k {
                    let mut cand = ring.clone();
                    cand[i..=j].reverse();
                    let cs = score(&cand);
                    if better(&cs, &s) {
                        ring = cand;
                        s = cs;
                        improved = true;
                    }
                }
            }
            if !improved {
                break;
            }
        }
        if best.as_ref().is_none_or(|(_, b)| better(&s, b)) {
            best = Some((ring, s));
        }
    }
    best.map(|b| b.0)
}

#[cfg(test)]
mod tests;
