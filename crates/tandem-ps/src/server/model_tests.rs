//! Unit tests of the model: sync steps summed on arrival and left in place, workers lost part-way,
//! copy-in, the buffer pool.

use super::*;

fn one_partition(numel: usize) -> Model {
    let mode = Mode::sync_for_test(3, 2);
    Model::one_partition_for_test(1, Optimizer::sgd(1.0), mode, numel as u64)
}

/// A gradient held "elsewhere" for tests; `readable` pieces can be read, then it is gone.
#[derive(Debug)]
struct Held {
    key: Key,
    values: Vec<f32>,
    readable: usize,
}

/// What a source that lost its worker says.
fn gone() -> Unreadable {
    Unreadable::Left {
        worker: 1,
        detail: " (gone)".into(),
    }
}

impl GradientSource for Held {
    fn covers(&self, key: &Key) -> bool {
        *key == self.key
    }
    fn partitions(&self) -> Vec<Key> {
        vec![self.key.clone()]
    }
    fn read(&self, _: &Key, at: usize, dst: &mut [f32]) -> Result<(), Unreadable> {
        if at / PIECE >= self.readable {
            return Err(gone());
        }
        dst.copy_from_slice(&self.values[at..at + dst.len()]);
        Ok(())
    }
}

fn held(values: Vec<f32>, readable: usize) -> Box<dyn GradientSource> {
    Box::new(Held {
        key: ("w".into(), 0),
        values,
        readable,
    })
}

#[test]
fn gradients_left_in_place_average_like_gradients_summed_on_arrival() {
    let numel = 2 * PIECE + 5;
    let key: Key = ("w".into(), 0);
    let grads: Vec<Vec<f32>> = (0..3)
        .map(|w| {
            (0..numel)
                .map(|i| ((i * 7 + w * 13) % 101) as f32 * 0.37 - 17.0)
                .collect()
        })
        .collect();
    // Every gradient summed on arrival (the streams)...
    let streamed = one_partition(numel);
    let mut step = SyncStep::default();
    for g in &grads {
        step.add(HashMap::from([(key.clone(), g.clone())]), &streamed.pool);
    }
    streamed.finish_step(&mut step);
    // ...and one streamed plus two left in the workers (pushed in reverse order: summed in
    // worker order all the same).
    let mixed = one_partition(numel);
    let mut step = SyncStep::default();
    step.add(
        HashMap::from([(key.clone(), grads[0].clone())]),
        &mixed.pool,
    );
    for w in [2, 1] {
        step.pending.push(Pending {
            worker: w as u32,
            source: held(grads[w].clone(), usize::MAX),
        });
    }
    mixed.finish_step(&mut step);
    let a = streamed.parts[&key].data.read().unwrap();
    let b = mixed.parts[&key].data.read().unwrap();
    assert!(
        a.values
            .iter()
            .zip(&b.values)
            .all(|(x, y)| x.to_bits() == y.to_bits())
    );
    assert_eq!(*mixed.version.borrow(), 1);
    assert!(step.pending.is_empty() && step.acc.is_empty());
}

#[test]
fn a_gradient_copied_in_joins_the_sum_and_one_that_cannot_be_read_is_withdrawn() {
    let numel = PIECE + 7;
    let model = one_partition(numel);
    let key: Key = ("w".into(), 0);
    let mut step = SyncStep::default();
    for (w, readable) in [(0u32, usize::MAX), (1, 1)] {
        step.contributors.insert(w);
        step.pending.push(Pending {
            worker: w,
            source: held(vec![w as f32 + 1.0; numel], readable),
        });
    }
    assert_eq!(model.copy_in(&mut step, 0), Ok(true));
    assert_eq!(step.acc[&key].count, 1);
    assert!(step.acc[&key].values.iter().all(|v| *v == 1.0));
    assert_eq!(model.copy_in(&mut step, 0), Ok(false), "no longer pending");
    assert_eq!(model.copy_in(&mut step, 1), Err(gone()));
    assert!(step.pending.is_empty());
    assert_eq!(step.contributors, BTreeSet::from([0]), "worker 1 withdrawn");
    assert_eq!(step.acc[&key].count, 1, "nothing of worker 1 added");
}

#[test]
fn a_worker_lost_half_way_counts_only_where_it_was_read() {
    let numel = 2 * PIECE + 5;
    let model = one_partition(numel);
    let key: Key = ("w".into(), 0);
    let mut step = SyncStep::default();
    step.pending.push(Pending {
        worker: 0,
        source: held(vec![3.0; numel], 1), // gone after its first piece
    });
    step.pending.push(Pending {
        worker: 1,
        source: held(vec![6.0; numel], usize::MAX),
    });
    step.add(
        HashMap::from([(key.clone(), vec![6.0; numel])]),
        &model.pool,
    );
    let partial = model.finish_step(&mut step);
    let d = model.parts[&key].data.read().unwrap();
    // SGD with lr 1 from zeros: minus the mean of what reached each element.
    assert!(d.values[..PIECE].iter().all(|v| *v == -5.0));
    assert!(d.values[PIECE..].iter().all(|v| *v == -6.0));
    // Worker 0's push must say exactly that: its first piece, nothing else.
    let expected = Partial {
        applied: vec![(key.clone(), PIECE)],
        why: gone(),
    };
    assert_eq!(partial, HashMap::from([(0, expected.clone())]));
    assert_eq!(model.partial_of(0, 0), Some(expected));
    assert_eq!(model.partial_of(0, 1), None, "worker 1 was read whole");
    assert_eq!(model.partial_of(1, 0), None, "another step");
}

#[test]
fn a_lost_worker_under_clipping_is_reported_with_what_the_applied_update_held() {
    // With clipping the average is read twice (norm, then update): a worker lost during the
    // first pass is in none of the update.
    let numel = 2 * PIECE;
    let mut opt = Optimizer::sgd(1.0);
    opt.clip_norm = 1e9;
    let model = Model::one_partition_for_test(1, opt, Mode::sync_for_test(2, 2), numel as u64);
    let mut step = SyncStep::default();
    step.pending.push(Pending {
        worker: 3,
        source: held(vec![2.0; numel], 1),
    });
    let partial = model.finish_step(&mut step);
    assert_eq!(partial[&3].applied, vec![], "{}", partial[&3]);
    assert!(partial[&3].to_string().starts_with("nothing applied"));
}

#[test]
fn an_async_gradient_lost_at_piece_k_reports_exactly_the_pieces_applied() {
    for k in 0..3 {
        let numel = 2 * PIECE + 5;
        let mut mode_async = one_partition(numel);
        mode_async.mode.sync = false;
        let model = mode_async;
        let key: Key = ("w".into(), 0);
        let grad: Vec<f32> = (0..numel).map(|i| (i % 13) as f32 + 1.0).collect();
        let mut scratch = vec![0.0; PIECE];
        let r = model.apply_source(&*held(grad.clone(), k), 0, Some(&[0.0]), &mut scratch);
        let d = model.parts[&key].data.read().unwrap();
        let upto = (k * PIECE).min(numel);
        // Every element before the failure applied exactly once, none after.
        for (i, v) in d.values.iter().enumerate() {
            let want = if i < upto { -grad[i] } else { 0.0 };
            assert_eq!(*v, want, "k {k} element {i}");
        }
        match r {
            Ok(()) => panic!("a source gone at piece {k} cannot be applied whole"),
            Err(p) => {
                let want: Vec<(Key, usize)> = if upto == 0 {
                    vec![]
                } else {
                    vec![(key.clone(), upto)]
                };
                assert_eq!(p.applied, want, "k {k}");
            }
        }
    }
    let model = one_partition(PIECE + 1);
    let mut scratch = vec![0.0; PIECE];
    assert_eq!(
        model.apply_source(
            &*held(vec![1.0; PIECE + 1], 2),
            0,
            Some(&[0.0]),
            &mut scratch
        ),
        Ok(()),
        "a source readable to the end is applied whole"
    );
}

/// A gradient that can be read once, in order, like a push through the stream: a second read of
/// any piece fails.
#[derive(Debug)]
struct ReadOnce {
    inner: Held,
    next: std::sync::Mutex<usize>,
}

impl GradientSource for ReadOnce {
    fn covers(&self, key: &Key) -> bool {
        self.inner.covers(key)
    }
    fn partitions(&self) -> Vec<Key> {
        self.inner.partitions()
    }
    fn read(&self, key: &Key, at: usize, dst: &mut [f32]) -> Result<(), Unreadable> {
        let mut next = self.next.lock().unwrap();
        if at != *next {
            return Err(Unreadable::Stream {
                worker: 0,
                problem: format!("read at {at}, the stream is at {next}"),
            });
        }
        *next = at + dst.len();
        self.inner.read(key, at, dst)
    }
    fn rereadable(&self) -> bool {
        false
    }
}

fn read_once(values: Vec<f32>) -> Box<dyn GradientSource> {
    Box::new(ReadOnce {
        inner: Held {
            key: ("w".into(), 0),
            values,
            readable: usize::MAX,
        },
        next: std::sync::Mutex::new(0),
    })
}

fn clipping(numel: usize, sync: bool, clip_norm: f32) -> Model {
    let mut model = one_partition(numel);
    model.mode.sync = sync;
    model.mode.replicas_to_aggregate = 2;
    model.optimizer.clip_norm = clip_norm;
    model
}

fn values(model: &Model) -> Vec<f32> {
    model.parts[&("w".to_string(), 0)]
        .data
        .read()
        .unwrap()
        .values
        .clone()
}

#[test]
fn a_sync_step_with_clipping_stages_sources_read_once_and_matches_sources_read_twice() {
    let numel = 2 * PIECE + 3;
    let grads: Vec<Vec<f32>> = (0..2)
        .map(|w| {
            (0..numel)
                .map(|i| ((i * 3 + w * 5) % 17) as f32 - 8.0)
                .collect()
        })
        .collect();
    // Small enough to clip, so the norm matters.
    for clip_norm in [1.0, 0.0] {
        let twice = clipping(numel, true, clip_norm);
        let mut step = SyncStep::default();
        for (w, g) in grads.iter().enumerate() {
            step.pending.push(Pending {
                worker: w as u32,
                source: held(g.clone(), usize::MAX),
            });
        }
        assert!(twice.finish_step(&mut step).is_empty());
        let once = clipping(numel, true, clip_norm);
        let mut step = SyncStep::default();
        for (w, g) in grads.iter().enumerate() {
            step.pending.push(Pending {
                worker: w as u32,
                source: read_once(g.clone()),
            });
        }
        let partial = once.finish_step(&mut step);
        assert!(partial.is_empty(), "clip {clip_norm}: {partial:?}");
        let (a, b) = (values(&twice), values(&once));
        assert!(a.iter().any(|v| *v != 0.0));
        assert_eq!(a, b, "clip {clip_norm}");
    }
}

#[test]
fn an_async_gradient_read_once_under_clipping_is_staged_and_clipped_like_one_with_norms() {
    let numel = PIECE + 7;
    let grad: Vec<f32> = (0..numel).map(|i| (i % 11) as f32 - 5.0).collect();
    let norm_sq = crate::optimizer::add_squares(0.0, &grad);
    let with_norms = clipping(numel, false, 2.0);
    let mut scratch = vec![0.0; PIECE];
    with_norms
        .apply_source(
            &*held(grad.clone(), usize::MAX),
            0,
            Some(&[norm_sq]),
            &mut scratch,
        )
        .unwrap();
    let staged = clipping(numel, false, 2.0);
    staged
        .apply_source(&*read_once(grad.clone()), 0, None, &mut scratch)
        .unwrap();
    let (a, b) = (values(&with_norms), values(&staged));
    let norm: f32 = a.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 2.0).abs() < 1e-3, "clipped to 2: {norm}");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0), "{x} vs {y}");
    }
    // A stream that breaks in the second partition piece reports nothing applied (the partition
    // was staged whole and never applied).
    let broken = clipping(numel, false, 2.0);
    let source = ReadOnce {
        inner: Held {
            key: ("w".into(), 0),
            values: grad,
            readable: 1,
        },
        next: std::sync::Mutex::new(0),
    };
    let p = broken
        .apply_source(&source, 0, None, &mut scratch)
        .unwrap_err();
    assert!(p.applied.is_empty(), "{p}");
    assert!(values(&broken).iter().all(|v| *v == 0.0));
}
