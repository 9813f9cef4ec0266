//! Early pulls, against a parameter-server process over the gRPC streams: a sync pull for the step
//! being applied receives each partition as soon as the step applied it, while another worker's
//! gradient for a later partition is still on its way, and the values are the step's; with a
//! standby following, nothing is sent before the step is published.

use std::time::Duration;

use tandem::rendezvous::JobToken;
use tandem_ps::pb;
use tandem_tests::start_ps_server;

const NODE: &str = env!("CARGO_BIN_EXE_tandem-test-node");
const LR: f32 = 0.5;
const ROWS: usize = 4;

fn declare() -> pb::DeclareRequest {
    let part = |part: u32| pb::Partition {
        param: "w".into(),
        part,
        shape: vec![2 * ROWS as u64],
        row_start: part as u64 * ROWS as u64,
        rows: ROWS as u64,
        dtype: "f32".into(),
        init: None,
    };
    pb::DeclareRequest {
        partitions: vec![part(0), part(1)],
        optimizer: Some(pb::Optimizer {
            kind: "sgd".into(),
            lr: f64::from(LR),
            ..Default::default()
        }),
        mode: Some(pb::Mode {
            sync: true,
            workers: 2,
            replicas_to_aggregate: 2,
            ..Default::default()
        }),
        map_hash: 7,
        compression: String::new(),
    }
}

fn bytes(v: &[f32]) -> bytes::Bytes {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Worker `worker`'s push of step 0: the chunk listing both partitions, then partition `part`'s
/// values of `g`.
fn header(worker: u32) -> pb::PushChunk {
    pb::PushChunk {
        worker,
        step: 0,
        parts: (0..2)
            .map(|part| pb::PartRef {
                param: "w".into(),
                part,
            })
            .collect(),
        push_id: 1 + worker as u64,
        ..Default::default()
    }
}

fn part_chunk(part: u32, g: &[f32]) -> pb::PushChunk {
    let rows = part as usize * ROWS..(part as usize + 1) * ROWS;
    pb::PushChunk {
        param: "w".into(),
        part,
        data: bytes(&g[rows]),
        ..Default::default()
    }
}

fn values(chunks: &[pb::PullChunk]) -> Vec<f32> {
    let mut w = vec![f32::NAN; 2 * ROWS];
    for c in chunks {
        let at = c.part as usize * ROWS + c.offset as usize / 4;
        for (i, b) in c.data.chunks_exact(4).enumerate() {
            w[at + i] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
    w
}

fn case(standby: bool) {
    let token = JobToken::generate();
    let (mut server, addr) = start_ps_server(NODE, token.as_str(), &[], "tcp");
    let mut follower =
        standby.then(|| start_ps_server(NODE, token.as_str(), &["--follow", &addr], "tcp").0);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut c = tandem_tests::ps_client(&addr, token.as_str()).await;
        c.declare(declare()).await.expect("declare");
        if standby {
            let mut following = false;
            for _ in 0..400 {
                let s = c.stats(pb::StatsRequest {}).await.expect("stats");
                if !s.into_inner().standby.is_empty() {
                    following = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(following, "no standby followed the server within 20 s");
        }
        let g0: Vec<f32> = (1..=8).map(|i| i as f32).collect();
        let g1: Vec<f32> = (1..=8).map(|i| -3.0 * i as f32 + 0.5).collect();
        // Reference: SGD from zeros on the mean of both gradients.
        let want: Vec<f32> = g0
            .iter()
            .zip(&g1)
            .map(|(a, b)| -LR * (a + b) / 2.0)
            .collect();
        // Worker 0 sends its whole gradient; worker 1 partition 0 only, for now.
        let (tx0, rx0) = tokio::sync::mpsc::channel(8);
        for ch in [header(0), part_chunk(0, &g0), part_chunk(1, &g0)] {
            tx0.send(ch).await.expect("queue");
        }
        drop(tx0);
        let (tx1, rx1) = tokio::sync::mpsc::channel(8);
        for ch in [header(1), part_chunk(0, &g1)] {
            tx1.send(ch).await.expect("queue");
        }
        let push = |rx| {
            let mut c = c.clone();
            tokio::spawn(async move {
                c.push(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .map(|r| r.into_inner())
            })
        };
        let (push0, push1) = (push(rx0), push(rx1));
        // The pull, in its own task: its first chunk is handed over as soon as it arrives.
        let (first_tx, mut first_rx) = tokio::sync::oneshot::channel();
        let pulled = {
            let mut c = c.clone();
            tokio::spawn(async move {
                let req = pb::PullRequest {
                    worker: 0,
                    min_version: 1,
                    timeout_ms: 60_000,
                    ..Default::default()
                };
                let mut pull = c.pull(req).await?.into_inner();
                let first = pull.message().await?;
                let _ = first_tx.send(first);
                let mut rest = Vec::new();
                while let Some(ch) = pull.message().await? {
                    rest.push(ch);
                }
                Ok::<_, tonic::Status>(rest)
            })
        };
        let first = if standby {
            // The step cannot be published (worker 1's partition 1 is missing), so nothing may
            // come: a standby must hold a step before any worker sees it.
            let early = tokio::time::timeout(Duration::from_millis(500), &mut first_rx).await;
            assert!(
                early.is_err(),
                "a partition was sent before the standby held its step: {early:?}"
            );
            None
        } else {
            let first = tokio::time::timeout(Duration::from_secs(60), &mut first_rx)
                .await
                .expect("partition 0 within 60 s")
                .expect("pull task")
                .expect("a chunk");
            assert_eq!((first.param.as_str(), first.part), ("w", 0));
            assert_eq!(first.version, 1, "reported as the version asked for");
            let stats = c.stats(pb::StatsRequest {}).await.expect("stats");
            assert_eq!(
                stats.into_inner().version,
                0,
                "partition 0 came before its step was published"
            );
            Some(first)
        };
        tx1.send(part_chunk(1, &g1)).await.expect("queue");
        drop(tx1);
        let first = match first {
            Some(f) => f,
            None => tokio::time::timeout(Duration::from_secs(60), first_rx)
                .await
                .expect("partition 0 within 60 s")
                .expect("pull task")
                .expect("a chunk"),
        };
        let rest = tokio::time::timeout(Duration::from_secs(60), pulled)
            .await
            .expect("the rest within 60 s")
            .expect("pull task")
            .expect("pull stream");
        let chunks: Vec<pb::PullChunk> = std::iter::once(first).chain(rest).collect();
        assert_eq!(values(&chunks), want, "the step's values, every partition");
        for p in [push0, push1] {
            let r = p.await.expect("task").expect("push");
            assert!(r.applied && r.version == 1, "{r:?}");
        }
        let stats = c.stats(pb::StatsRequest {}).await.expect("stats");
        assert_eq!(stats.into_inner().version, 1);
    });
    let _ = server.kill();
    let _ = server.wait();
    if let Some(f) = follower.as_mut() {
        let _ = f.kill();
        let _ = f.wait();
    }
}

#[test]
fn a_sync_pull_receives_each_partition_once_applied_before_the_step_is_published() {
    case(false);
}

#[test]
fn with_a_standby_a_sync_pull_waits_until_the_step_is_published() {
    case(true);
}
