//! The group's compression on a group of one: PowerSGD against references computed here,
//! batches, fused gradients, refusals.

use super::*;
use tandem_core::ClusterSpec;

fn one() -> ProcessGroup {
    let spec = ClusterSpec::from_vars(&[("UNSET", "")]).expect("a group of one");
    ProcessGroup::init(&spec, None, GroupConfig::default()).expect("a group of one")
}

fn grad(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (((i * 37 + seed * 101) % 97) as f32 / 97.0 - 0.5) * (1.0 + (i % 5) as f32))
        .collect()
}

fn power(rank: usize, columns: usize) -> Compressor {
    Compressor::new(Compression::PowerSgd { rank }).with_columns(columns)
}

/// Error feedback loses nothing: over several steps, what was sent plus what is still owed
/// is what came in (a group of one, so the average is this rank's own). A length that is not
/// a multiple of the columns (a short last row) included.
#[test]
fn what_powersgd_sends_plus_its_residual_adds_up_to_its_inputs() {
    let pg = one();
    for (len, cols) in [(35, 7), (33, 7), (12, 4)] {
        let mut c = power(1, cols);
        let (mut sent, mut came) = (vec![0f64; len], vec![0f64; len]);
        for step in 0..4 {
            let mut g = grad(len, step);
            came.iter_mut().zip(&g).for_each(|(a, x)| *a += *x as f64);
            pg.allreduce_compressed(&mut g, ReduceOp::Avg, &mut c)
                .unwrap();
            sent.iter_mut().zip(&g).for_each(|(a, x)| *a += *x as f64);
        }
        let rank_one = grad(len, 0) != {
            let mut g = grad(len, 0);
            pg.allreduce_compressed(&mut g, ReduceOp::Avg, &mut power(1, cols))
                .unwrap();
            g
        };
        assert!(rank_one, "{len}: rank 1 keeps the matrix whole?");
        for i in 0..len {
            let total = sent[i] + c.residual[i] as f64;
            assert!(
                (total - came[i]).abs() < 1e-4,
                "{len}/{cols} [{i}]: {total} vs {}",
                came[i]
            );
        }
    }
}

/// With as many factors as columns (fewer than rows), `P` spans M's columns and `P Qᵀ` is M
/// itself: the products are right (rows of 8 values and more take the vector loops).
#[test]
fn powersgd_with_as_many_factors_as_columns_returns_the_matrix() {
    let pg = one();
    for (rows, cols) in [(40usize, 10usize), (24, 17), (9, 3)] {
        let mut g = grad(rows * cols, 4);
        pg.allreduce_compressed(&mut g, ReduceOp::Avg, &mut power(cols, cols))
            .unwrap();
        for (i, (x, want)) in g.iter().zip(grad(rows * cols, 4)).enumerate() {
            assert!(
                (x - want).abs() < 1e-4,
                "{rows}x{cols} [{i}]: {x} vs {want}"
            );
        }
    }
}

/// Rank 2 of wider matrices against a float64 reference written here (plain loops, QR by
/// Gram-Schmidt): what every product computes, not only what it spans.
#[test]
fn powersgd_of_rank_two_matches_a_float64_reference() {
    let pg = one();
    for (rows, cols) in [(12usize, 10usize), (9, 17)] {
        let m: Vec<f64> = grad(rows * cols, 5).iter().map(|x| *x as f64).collect();
        let qt: Vec<f64> = crate::compression::warm_start(2 * cols)
            .iter()
            .map(|x| *x as f64)
            .collect();
        // P = M Q, columns orthonormalised in order.
        let mut p = vec![[0f64; 2]; rows];
        for (r, pr) in p.iter_mut().enumerate() {
            for (k, pk) in pr.iter_mut().enumerate() {
                *pk = (0..cols).map(|c| m[r * cols + c] * qt[k * cols + c]).sum();
            }
        }
        for k in 0..2 {
            for prev in 0..k {
                let d: f64 = p.iter().map(|row| row[k] * row[prev]).sum();
                p.iter_mut().for_each(|row| row[k] -= d * row[prev]);
            }
            let n = p.iter().map(|row| row[k] * row[k]).sum::<f64>().sqrt();
            p.iter_mut().for_each(|row| row[k] /= n);
        }
        let mut g = grad(rows * cols, 5);
        pg.allreduce_compressed(&mut g, ReduceOp::Sum, &mut power(2, cols))
            .unwrap();
        for r in 0..rows {
            for c in 0..cols {
                // (P Pᵀ M)[r][c]
                let want: f64 = (0..2)
                    .map(|k| p[r][k] * (0..rows).map(|i| p[i][k] * m[i * cols + c]).sum::<f64>())
                    .sum();
                let got = g[r * cols + c] as f64;
                assert!(
                    (got - want).abs() < 1e-4,
                    "{rows}x{cols} [{r}][{c}]: {got} vs {want}"
                );
            }
        }
    }
}

/// A batch of exact tensors only: one allreduce, their values kept (a group of one).
#[test]
fn a_batch_of_exact_tensors_only_keeps_them() {
    let pg = one();
    let (mut a, mut b) = (grad(6, 1), grad(2, 2));
    pg.allreduce_power_sgd_batch(Vec::new(), vec![&mut a[..], &mut b[..]], ReduceOp::Avg)
        .unwrap();
    assert_eq!((a, b), (grad(6, 1), grad(2, 2)));
}

/// A batch gives each matrix what it alone would get, and the exact tensors their values.
#[test]
fn a_batch_gives_each_matrix_what_it_alone_gets_and_leaves_the_exact_ones_exact() {
    let pg = one();
    let shapes = [(6usize, 5usize), (4, 3), (9, 2)];
    let alone: Vec<(Vec<f32>, Compressor)> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(r, cols))| {
            let (mut g, mut c) = (grad(r * cols, i), power(2, cols));
            for _ in 0..2 {
                g = grad(r * cols, i);
                pg.allreduce_compressed(&mut g, ReduceOp::Sum, &mut c)
                    .unwrap();
            }
            (g, c)
        })
        .collect();
    let mut comps: Vec<Compressor> = shapes.iter().map(|&(_, cols)| power(2, cols)).collect();
    let mut bias = grad(5, 9);
    let mut gs = Vec::new();
    for _ in 0..2 {
        gs = shapes
            .iter()
            .enumerate()
            .map(|(i, &(r, c))| grad(r * c, i))
            .collect::<Vec<_>>();
        bias = grad(5, 9);
        let matrices = gs
            .iter_mut()
            .map(|g| &mut g[..])
            .zip(comps.iter_mut())
            .collect();
        pg.allreduce_power_sgd_batch(matrices, vec![&mut bias[..]], ReduceOp::Sum)
            .unwrap();
    }
    for ((g, c), (want, want_c)) in gs.iter().zip(&comps).zip(&alone) {
        assert_eq!(g, want);
        assert_eq!((&c.residual, &c.q), (&want_c.residual, &want_c.q));
    }
    assert_eq!(bias, grad(5, 9));
    // Nothing to send: nothing sent, no error.
    pg.allreduce_power_sgd_batch(Vec::new(), Vec::new(), ReduceOp::Avg)
        .unwrap();
}

/// Several gradients fused: bf16 rounds each once in place (a group of one: each value
/// becomes its bf16 rounding), top-k treats them as one gradient with one residual.
#[test]
fn fused_gradients_are_compressed_as_one() {
    let pg = one();
    let (mut a, mut b) = (grad(10, 1), grad(3, 2));
    let mut c = Compressor::new(Compression::Bf16);
    pg.allreduce_compressed_many(vec![&mut a[..], &mut b[..]], ReduceOp::Sum, &mut c)
        .unwrap();
    let round = |v: Vec<f32>| -> Vec<f32> {
        v.iter()
            .map(|x| half::bf16::from_f32(*x).to_f32())
            .collect()
    };
    assert_eq!(
        (a.clone(), b.clone()),
        (round(grad(10, 1)), round(grad(3, 2)))
    );
    assert_ne!(a, grad(10, 1));
    let mut flat: Vec<f32> = grad(10, 1).into_iter().chain(grad(3, 2)).collect();
    let mut alone = Compressor::new(Compression::TopK { fraction: 0.25 });
    pg.allreduce_compressed(&mut flat, ReduceOp::Sum, &mut alone)
        .unwrap();
    let (mut a, mut b) = (grad(10, 1), grad(3, 2));
    let mut c = Compressor::new(Compression::TopK { fraction: 0.25 });
    pg.allreduce_compressed_many(vec![&mut a[..], &mut b[..]], ReduceOp::Sum, &mut c)
        .unwrap();
    assert_eq!([a, b].concat(), flat);
    assert_eq!(c.residual, alone.residual);
}

/// Refusals come before anything changes: a compressor of another setting (named by its
/// place), an operator PowerSGD cannot compute, a residual of another length further down
/// the batch (the first matrix then keeps its gradient and its state).
#[test]
fn a_bad_batch_is_refused_before_any_matrix_changes() {
    let pg = one();
    let (mut a, mut b) = (grad(12, 1), grad(12, 2));
    let mut ca = power(2, 4);
    let mut bf = Compressor::new(Compression::Bf16);
    let e = pg
        .allreduce_power_sgd_batch(
            vec![(&mut a[..], &mut ca), (&mut b[..], &mut bf)],
            vec![],
            ReduceOp::Avg,
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("matrix 1") && e.to_string().contains("not bf16"),
        "{e}"
    );
    let e = pg
        .allreduce_power_sgd_batch(vec![(&mut a[..], &mut ca)], vec![], ReduceOp::Max)
        .unwrap_err();
    assert!(e.to_string().contains("powersgd"), "{e}");
    // A compressor that served a tensor of 8 elements, given one of 12.
    let mut cb = power(2, 4);
    pg.allreduce_compressed(&mut grad(8, 3), ReduceOp::Avg, &mut cb)
        .unwrap();
    pg.allreduce_compressed(&mut grad(12, 3), ReduceOp::Avg, &mut ca)
        .unwrap();
    let state = ca.state();
    let e = pg
        .allreduce_power_sgd_batch(
            vec![(&mut a[..], &mut ca), (&mut b[..], &mut cb)],
            vec![],
            ReduceOp::Avg,
        )
        .unwrap_err();
    assert!(e.to_string().contains("8 elements, not 12"), "{e}");
    assert_eq!((a, ca.state()), (grad(12, 1), state));
    // The same batch with a right compressor goes through.
    let mut cb = power(2, 4);
    let (mut a, mut b) = (grad(12, 1), grad(12, 2));
    pg.allreduce_power_sgd_batch(
        vec![(&mut a[..], &mut ca), (&mut b[..], &mut cb)],
        vec![],
        ReduceOp::Avg,
    )
    .unwrap();
}
