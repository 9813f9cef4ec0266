//! Collectives on GPU buffers. Without the `nccl` feature or without a GPU these check the error
//! that says why; with both (`scripts/gpu-check`) they run NCCL on one GPU (world size 1: NCCL needs
//! one rank per GPU) and the host-staged TCP path.

#![allow(clippy::unwrap_used)]

use tandem_collective::device::DeviceGroup;
use tandem_collective::{BackendKind, GroupConfig, ProcessGroup};
use tandem_core::Error;
use tandem_core::ReduceOp;
use tandem_core::cluster::ClusterSpec;

fn single(kind: BackendKind) -> Result<ProcessGroup, Error> {
    let spec = ClusterSpec::builder()
        .rank(0)
        .world_size(1)
        .build()
        .unwrap();
    let config = GroupConfig {
        backend: kind,
        ..GroupConfig::default()
    };
    ProcessGroup::init(&spec, None, config)
}

/// The group, or `None` (and a note) on a machine without a GPU or a build without the feature.
fn gpu(kind: BackendKind) -> Option<DeviceGroup> {
    match single(kind).and_then(|pg| DeviceGroup::new(&pg, 0)) {
        Ok(g) => Some(g),
        Err(Error::BackendUnavailable { backend, reason })
            if backend == "cuda" || reason.contains("nccl feature") =>
        {
            eprintln!("skipped: {reason}");
            None
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[test]
fn without_a_gpu_or_the_feature_the_error_says_why() {
    match DeviceGroup::new(&single(BackendKind::Auto).unwrap(), 0) {
        Ok(g) => eprintln!("a GPU is here: backend {}", g.backend_name()),
        Err(e) => {
            let text = e.to_string();
            let expected = if cfg!(feature = "nccl") {
                "libcuda"
            } else {
                "nccl feature"
            };
            assert!(text.contains(expected), "{text}");
        }
    }
}

fn exercise(g: &DeviceGroup) {
    let host: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
    let buf = g.to_device(&host).unwrap();
    assert_eq!(g.to_host(&buf).unwrap(), host, "round trip");
    // World of one: every collective leaves the data as it was.
    let buf = g.allreduce(buf, ReduceOp::Sum).unwrap();
    assert_eq!(g.to_host(&buf).unwrap(), host);
    let buf = g.broadcast(buf, 0).unwrap();
    assert_eq!(g.to_host(&buf).unwrap(), host);
    let (buf, all) = g.allgather(buf).unwrap();
    assert_eq!(g.to_host(&all).unwrap(), host);
    let (buf, part) = g.reduce_scatter(buf, ReduceOp::Max).unwrap();
    assert_eq!(g.to_host(&part).unwrap(), host);
    let many = vec![buf, g.to_device(&[1.0f32, 2.0]).unwrap()];
    let many = g.allreduce_many(many, ReduceOp::Avg).unwrap();
    assert_eq!(g.to_host(&many[1]).unwrap(), [1.0, 2.0]);
    let ints = g.to_device(&[3i64, -4]).unwrap();
    let ints = g.allreduce(ints, ReduceOp::Prod).unwrap();
    assert_eq!(g.to_host(&ints).unwrap(), [3, -4]);
    assert!(
        g.broadcast(ints, 1)
            .unwrap_err()
            .to_string()
            .contains("root")
    );
}

#[test]
fn nccl_on_one_gpu() {
    if let Some(g) = gpu(BackendKind::Nccl) {
        assert_eq!(g.backend_name(), "nccl");
        exercise(&g);
    }
}

#[test]
fn host_staging_on_one_gpu() {
    if let Some(g) = gpu(BackendKind::Tcp) {
        assert!(g.backend_name().starts_with("tcp"));
        exercise(&g);
    }
}
