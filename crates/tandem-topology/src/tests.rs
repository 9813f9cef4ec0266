use super::*;

fn fixture(name: &str) -> Topology {
    let path = format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    Topology::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn nvswitch_machines_use_nvlink_for_every_size() {
    let t = fixture("nvswitch8.txt");
    assert_eq!(t.gpus.len(), 8);
    assert_eq!(t.gpus[5].numa, Some(1));
    assert_eq!(t.gpus[0].cpu_affinity.as_deref(), Some("0-47,96-143"));
    for k in 1..=8 {
        let p = choose(&t, k).unwrap();
        assert_eq!(p.ring.len(), k);
        if k > 1 {
            assert_eq!(p.bottleneck.2, Link::NvLink(18));
        }
    }
    // Four GPUs stay on one NUMA node when every link is equal.
    let p = choose(&t, 4).unwrap();
    let numa: Vec<_> = p.ring.iter().map(|&g| t.gpus[g].numa).collect();
    assert!(numa.windows(2).all(|w| w[0] == w[1]), "{p:?}");
}

#[test]
fn a_hybrid_cube_mesh_gets_an_all_nvlink_ring() {
    let t = fixture("dgx1.txt");
    assert_eq!(t.gpus.len(), 8, "NIC rows and columns are ignored");
    assert_eq!(t.links[0][3], Link::NvLink(2));
    assert_eq!(t.links[0][5], Link::Sys);
    let p = choose(&t, 8).unwrap();
    assert!(p.steps.iter().all(|l| l.is_nvlink()), "{p:?}");
    let p = choose(&t, 2).unwrap();
    assert_eq!(
        p.bottleneck.2,
        Link::NvLink(2),
        "a double-linked pair: {p:?}"
    );
    let p = choose(&t, 4).unwrap();
    assert!(p.steps.iter().all(|l| l.is_nvlink()), "{p:?}");
}

#[test]
fn nvlink_pairs_over_pcie_give_a_linked_pair() {
    let t = fixture("pairs4.txt");
    let p = choose(&t, 2).unwrap();
    let mut pair = p.ring.clone();
    pair.sort_unstable();
    assert!(pair == [0, 2] || pair == [1, 3], "{p:?}");
    assert_eq!(p.bottleneck.2, Link::NvLink(4));
    // All four: each pair adjacent in the ring, so only two steps cross PCIe.
    let p = choose(&t, 4).unwrap();
    assert_eq!(p.bottleneck.2, Link::Phb);
    assert_eq!(p.steps.iter().filter(|l| l.is_nvlink()).count(), 2, "{p:?}");
}

#[test]
fn pcie_only_prefers_the_shortest_path() {
    let t = fixture("pcie4.txt");
    let p = choose(&t, 2).unwrap();
    assert_eq!(p.ring, vec![0, 1]);
    assert_eq!(p.bottleneck.2, Link::Pix);
    let p = choose(&t, 4).unwrap();
    assert_eq!(p.bottleneck.2, Link::Sys);
    assert_eq!(p.steps.iter().filter(|l| **l == Link::Sys).count(), 2);
}

#[test]
fn one_gpu_is_a_ring_of_one() {
    // Recorded on a one-H200 machine (driver 580): the header carries terminal escapes.
    let t = fixture("h200x1.txt");
    assert_eq!(t.gpus.len(), 1);
    assert_eq!(t.gpus[0].cpu_affinity.as_deref(), Some("0-15"));
    assert_eq!(t.gpus[0].numa, Some(0));
    let p = choose(&t, 1).unwrap();
    assert_eq!(p.ring, vec![0]);
    assert_eq!(p.device_for(0), Some(0));
    assert!(
        choose(&t, 2)
            .unwrap_err()
            .to_string()
            .contains("2 of this machine's 1")
    );
}

#[test]
fn large_machines_are_searched_greedily_and_still_find_nvlink() {
    // 16 GPUs: NVLink pairs (2i, 2i+1), PCIe between pairs.
    let mut text = String::from("");
    for j in 0..16 {
        text.push_str(&format!("\tGPU{j}"));
    }
    text.push_str("\tCPU Affinity\n");
    for i in 0..16 {
        text.push_str(&format!("GPU{i}"));
        for j in 0..16 {
            let c = if i == j {
                " X "
            } else if i / 2 == j / 2 {
                "NV8"
            } else {
                "SYS"
            };
            text.push_str(&format!("\t{c}"));
        }
        text.push_str("\t0-7\n");
    }
    let t = Topology::parse(&text).unwrap();
    let p = choose(&t, 2).unwrap();
    assert_eq!(p.bottleneck.2, Link::NvLink(8));
    let p = choose(&t, 8).unwrap();
    assert_eq!(p.steps.iter().filter(|l| l.is_nvlink()).count(), 4, "{p:?}");
}

#[test]
fn terminal_escapes_are_ignored_wherever_they_are() {
    let plain = "\tGPU0\tGPU1\tCPU Affinity\nGPU0\t X \tNV18\t0-7\nGPU1\tNV18\t X \t0-7\n";
    let dressed = "\t\u{1b}[4mGPU0\tGPU1\tCPU Affinity\u{1b}[0m\n\u{1b}[1mGPU0\u{1b}[0m\t X \tNV18\t0-7\n\
                   GPU1\t\u{1b}[32;1mNV18\u{1b}[m\t X \t0-7\n";
    let (a, b) = (
        Topology::parse(plain).unwrap(),
        Topology::parse(dressed).unwrap(),
    );
    assert_eq!(a.links, b.links);
    assert_eq!(b.links[0][1], Link::NvLink(18));
    assert_eq!(b.gpus[1].cpu_affinity.as_deref(), Some("0-7"));
}

#[test]
fn malformed_matrices_are_refused_with_the_reason() {
    for (text, why) in [
        ("", "empty"),
        ("\tCPU Affinity\nfoo\n", "no GPU columns"),
        ("\tGPU0\tGPU1\nGPU0\t X \tNV2\n", "2 GPUs but 1"),
        (
            "\tGPU0\tGPU1\nGPU0\t X \tFAST\nGPU1\tNV2\t X \n",
            "unknown link \"FAST\"",
        ),
        ("\tGPU0\tGPU1\nGPU0\t X \tNV2\nGPU1\tPHB\t X \n", "one way"),
        ("\tGPU0\tGPU1\nGPU0\tNV2\tNV2\nGPU1\tNV2\t X \n", "diagonal"),
        ("\tGPU1\tGPU0\nGPU0\t X \tNV2\nGPU1\tNV2\t X \n", "in order"),
        ("\tGPU0\tGPU1\nGPU0\t X \n", "cells"),
    ] {
        let e = Topology::parse(text).unwrap_err().to_string();
        assert!(e.contains(why), "{text:?}: {e}");
        assert!(e.contains("nvidia-smi topo -m"), "{e}");
    }
}

#[test]
fn the_matrix_prints_back() {
    let t = fixture("pairs4.txt");
    let m = t.matrix();
    assert!(m.contains("GPU2"));
    assert!(m.lines().nth(1).unwrap().contains("NV4"));
}
