use super::*;

#[test]
fn every_form_parses_and_prints_back_and_bad_ones_are_named() {
    for s in [
        "none",
        "fp16",
        "bf16",
        "topk:0.01",
        "topk:1",
        "powersgd:1",
        "powersgd:4",
    ] {
        let c: Compression = s.parse().expect(s);
        assert_eq!(c.to_string(), s);
    }
    assert_eq!(" BF16 ".parse::<Compression>().unwrap(), Compression::Bf16);
    assert_eq!("".parse::<Compression>().unwrap(), Compression::None);
    for bad in [
        "topk:0",
        "topk:1.5",
        "topk:-0.1",
        "topk:x",
        "topk",
        "powersgd:0",
        "powersgd:1025",
        "powersgd",
        "fp8",
        "bf16:2",
    ] {
        let e = bad.parse::<Compression>().unwrap_err().to_string();
        assert!(e.contains("compression"), "{bad}: {e}");
    }
    assert!(
        "auto"
            .parse::<Compression>()
            .unwrap_err()
            .to_string()
            .contains("not available yet")
    );
}

#[test]
fn half_casts_round_once_and_come_back() {
    let v = [1.0f32, -2.5, 3.0e-3, 65504.0, 1.0e30];
    for dtype in [DType::F16, DType::BF16] {
        let mut wire = vec![0u8; v.len() * 2];
        narrow(&v, dtype, &mut wire).unwrap();
        let mut back = [0f32; 5];
        widen(&wire, dtype, &mut back).unwrap();
        assert_eq!(back[0], 1.0);
        assert_eq!(back[1], -2.5);
        let tol = if dtype == DType::F16 { 1e-3 } else { 8e-3 };
        assert!(
            (back[2] - 3.0e-3).abs() / 3.0e-3 < tol,
            "{dtype}: {}",
            back[2]
        );
    }
    let mut wire = vec![0u8; 2];
    assert!(narrow(&[1.0], DType::F32, &mut wire).is_err());
    assert!(widen(&wire, DType::I32, &mut [0.0]).is_err());
}

#[test]
fn top_k_takes_the_largest_magnitudes_and_breaks_ties_by_index() {
    let v = [0.1f32, -5.0, 3.0, -3.0, 0.0, 4.0];
    assert_eq!(top_k(&v, 3), vec![1, 2, 5]);
    assert_eq!(top_k(&v, 2), vec![1, 5]);
    // 3.0 and -3.0 tie: the lower index wins.
    assert_eq!(top_k(&v, 4), vec![1, 2, 3, 5]);
    assert_eq!(top_k(&v, 10).len(), 6);
    assert!(top_k(&v, 0).is_empty());
}

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

#[test]
fn half_precision_is_chosen_only_where_the_link_is_slower_than_the_casts() {
    let mb = 64 << 20;
    // A 1 Gbit/s link (125 MB/s) against casts at 4 GB/s: worth it.
    assert_eq!(choose(mb, 125e6, 4e9), Compression::Bf16);
    // Loopback at 10 GB/s against the same casts: not.
    assert_eq!(choose(mb, 10e9, 4e9), Compression::None);
    assert_eq!(choose(mb, 0.0, 4e9), Compression::None);
    assert_eq!(Compression::Bf16.wire_fraction(100, 10), 0.5);
    assert_eq!(
        Compression::TopK { fraction: 0.01 }.wire_fraction(100, 10),
        0.02
    );
    assert_eq!(
        Compression::PowerSgd { rank: 1 }.wire_fraction(100, 10),
        0.2
    );
}
