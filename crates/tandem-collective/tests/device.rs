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

/// The `*_foreign` calls on memory a `DeviceBuffer` owns, passed by address as torch passes a
/// tensor's; and the addresses the driver check refuses.
#[cfg(feature = "nccl")]
#[allow(unsafe_code)]
fn exercise_foreign(g: &DeviceGroup) {
    use cudarc::driver::DevicePtr;
    use tandem_collective::device::ForeignBuffer;
    use tandem_core::DType;

    let host: Vec<f32> = (0..1000).map(|i| i as f32 - 3.0).collect();
    let buf = g.to_device(&host).unwrap();
    let out = g.to_device(&vec![0f32; 1000]).unwrap();
    let stream = buf.cuda().stream().clone();
    let addr = buf.cuda().device_ptr(&stream).0;
    let out_addr = out.cuda().device_ptr(&stream).0;
    // SAFETY: `buf` and `out` own 1000 f32 each on this group's GPU, outlive every call below,
    // and `to_device` finished writing them.
    let (f, o) = unsafe {
        (
            ForeignBuffer::new(addr, 1000, DType::F32),
            ForeignBuffer::new(out_addr, 1000, DType::F32),
        )
    };
    // World of one: each collective leaves the data as it was, or copies it whole.
    g.allreduce_foreign(f, ReduceOp::Sum).unwrap();
    g.broadcast_foreign(f, 0).unwrap();
    g.reduce_foreign(f, ReduceOp::Max, 0).unwrap();
    assert_eq!(g.to_host(&buf).unwrap(), host);
    g.allgather_foreign(f, o).unwrap();
    assert_eq!(g.to_host(&out).unwrap(), host);
    g.reduce_scatter_foreign(f, o, ReduceOp::Sum).unwrap();
    assert_eq!(g.to_host(&out).unwrap(), host);
    // Far past the allocation's end, host memory, null: refused before anything moves.
    let past = unsafe { ForeignBuffer::new(addr, 1 << 36, DType::F32) };
    let e = g
        .allreduce_foreign(past, ReduceOp::Sum)
        .unwrap_err()
        .to_string();
    assert!(e.contains("past the end"), "{e}");
    let on_host = unsafe { ForeignBuffer::new(host.as_ptr() as u64, 4, DType::F32) };
    let e = g.broadcast_foreign(on_host, 0).unwrap_err().to_string();
    assert!(e.contains("not GPU memory"), "{e}");
    let null = unsafe { ForeignBuffer::new(0, 4, DType::F32) };
    assert!(g.allreduce_foreign(null, ReduceOp::Sum).is_err());
    assert_eq!(
        g.to_host(&buf).unwrap(),
        host,
        "nothing refused changed the data"
    );
}

#[test]
fn nccl_on_one_gpu() {
    if let Some(g) = gpu(BackendKind::Nccl) {
        assert_eq!(g.backend_name(), "nccl");
        exercise(&g);
        #[cfg(feature = "nccl")]
        exercise_foreign(&g);
    }
}

#[test]
fn host_staging_on_one_gpu() {
    if let Some(g) = gpu(BackendKind::Tcp) {
        assert!(g.backend_name().starts_with("tcp"));
        exercise(&g);
        #[cfg(feature = "nccl")]
        exercise_foreign(&g);
    }
}
