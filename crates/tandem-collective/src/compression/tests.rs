use super::*;

#[test]
fn scatter_sum_adds_in_order_averages_and_refuses_a_bad_index() {
    let mut out = [9.0f32; 4];
    scatter_sum(&[(1, 2.0), (3, 1.0), (1, 4.0)], &mut out, ReduceOp::Sum, 2).unwrap();
    assert_eq!(out, [0.0, 6.0, 0.0, 1.0]);
    scatter_sum(&[(1, 2.0), (1, 4.0)], &mut out, ReduceOp::Avg, 2).unwrap();
    assert_eq!(out, [0.0, 3.0, 0.0, 0.0]);
    let e = scatter_sum(&[(4, 1.0)], &mut out, ReduceOp::Sum, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("index 4 beyond the 4 elements"), "{e}");
}

#[test]
fn orthonormalised_columns_have_unit_length_and_are_orthogonal() {
    // 3 × 2, row-major.
    let mut p = [1.0f32, 1.0, 0.0, 1.0, 1.0, 0.0];
    orthonormalise(&mut p, 3, 2);
    let col = |c: usize| [p[c], p[2 + c], p[4 + c]];
    let dot = |a: [f32; 3], b: [f32; 3]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    assert!((dot(col(0), col(0)) - 1.0).abs() < 1e-6);
    assert!((dot(col(1), col(1)) - 1.0).abs() < 1e-6);
    assert!(dot(col(0), col(1)).abs() < 1e-6);
    let mut zero = [0.0f32; 4];
    orthonormalise(&mut zero, 2, 2);
    assert_eq!(zero, [0.0; 4]);
}

#[test]
fn the_state_round_trips_and_a_bad_one_is_refused() {
    let mut c = Compressor::new(Compression::TopK { fraction: 0.5 }).with_columns(3);
    c.residual = vec![1.0, 2.0];
    c.q = vec![0.5];
    let back = Compressor::restore(&c.state()).unwrap();
    assert_eq!(back.compression, c.compression);
    assert_eq!((back.residual, back.q, back.columns), (c.residual, c.q, 3));
    assert!(Compressor::restore(b"nope").is_err());
    assert_eq!(Compressor::new(Compression::None).shape(10), (3, 4));
    assert_eq!(
        Compressor::new(Compression::None).with_columns(5).shape(10),
        (2, 5)
    );
}
