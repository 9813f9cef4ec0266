//! Checking what ranks printed against references computed independently here: each rank prints
//! `CASE <id> <json values>` per case of the suite; these functions parse that and compare it with
//! what the operation must give, from the same inputs.

#![allow(clippy::unwrap_used)] // test support: a panic is the failure report

use std::collections::BTreeMap;
use std::process::Output;

use tandem::{DType, ReduceOp};

use crate::data;
use crate::suite::Case;

/// Every case a rank printed: id → values. Panics (with the rank's output) when the rank failed.
pub fn cases_of(out: &Output) -> BTreeMap<usize, Vec<f64>> {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rank failed ({}):\n{}\n{}",
        out.status,
        text.lines()
            .filter(|l| !l.starts_with("CASE"))
            .collect::<Vec<_>>()
            .join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .filter_map(|l| l.strip_prefix("CASE "))
        .map(|l| {
            let (id, json) = l.split_once(' ').expect("CASE id json");
            (
                id.parse().expect("id"),
                serde_json::from_str(json).expect("values"),
            )
        })
        .collect()
}

/// The element range rank `r` owns after a reduce-scatter: balanced, the first `len % n` one longer.
pub fn owned(len: usize, n: usize, r: usize) -> std::ops::Range<usize> {
    let (base, extra) = (len / n, len % n);
    let start = r * base + r.min(extra);
    start..start + base + usize::from(r < extra)
}

/// Whether `got` equals `want`, allowing an average one rounding step of the dtype.
pub fn close(dtype: DType, op: Option<ReduceOp>, got: &[f64], want: &[f64]) -> bool {
    got.len() == want.len()
        && got.iter().zip(want).all(|(g, w)| {
            if g == w {
                return true;
            }
            // An average divides in the dtype (or f32 for half types) where the reference divides
            // exactly: the two may differ by one rounding step of the dtype.
            let eps = match dtype {
                DType::F32 => 2f64.powi(-23),
                DType::F64 => 2f64.powi(-52),
                DType::F16 => 2f64.powi(-10),
                DType::BF16 => 2f64.powi(-7),
                _ => 0.0,
            };
            op == Some(ReduceOp::Avg) && (g - w).abs() <= w.abs() * eps * 2.0 + eps
        })
}

/// Checks every rank's result of `case` against the reference from the ranks' inputs.
pub fn check_case(case: &Case, world: usize, results: &[BTreeMap<usize, Vec<f64>>]) {
    let inputs: Vec<Vec<f64>> = (0..world)
        .map(|r| data::values(case.id as u64, r, case.len, case.dtype, case.op))
        .collect();
    let rounded: Vec<Vec<f64>> = inputs
        .iter()
        .map(|v| data::from_bytes(case.dtype, &data::to_bytes(case.dtype, v)))
        .collect();
    let got = |r: usize| -> &Vec<f64> {
        results[r]
            .get(&case.id)
            .unwrap_or_else(|| panic!("rank {r} printed no result for case {case:?}"))
    };
    let label = format!("case {case:?}");
    match case.kind {
        "allreduce" => {
            let want = data::reference(case.dtype, case.op.expect("op"), &rounded);
            for r in 0..world {
                assert!(
                    close(case.dtype, case.op, got(r), &want),
                    "{label} rank {r}: {:?} vs {:?}",
                    &got(r)[..got(r).len().min(8)],
                    &want[..want.len().min(8)]
                );
            }
        }
        "reduce_scatter" => {
            let want = data::reference(case.dtype, case.op.expect("op"), &rounded);
            for r in 0..world {
                let range = owned(case.len, world, r);
                assert_eq!(got(r)[0] as usize, range.start, "{label} rank {r} range");
                assert!(
                    close(case.dtype, case.op, &got(r)[1..], &want[range]),
                    "{label} rank {r}"
                );
            }
        }
        "reduce" => {
            let want = data::reference(case.dtype, case.op.expect("op"), &rounded);
            assert!(close(case.dtype, case.op, got(case.root), &want), "{label}");
        }
        "broadcast" => {
            for r in 0..world {
                assert_eq!(got(r), &rounded[case.root], "{label} rank {r}");
            }
        }
        "allgather" => {
            let want: Vec<f64> = rounded.concat();
            for r in 0..world {
                assert_eq!(got(r), &want, "{label} rank {r}");
            }
        }
        "sendrecv" if world > 1 => {
            for r in 0..world {
                assert_eq!(
                    got(r),
                    &rounded[(r + world - 1) % world],
                    "{label} rank {r}"
                );
            }
        }
        "barrier" => {
            for r in 0..world {
                got(r);
            }
        }
        _ => {}
    }
}

/// The value of the sample `name{labels}` in a Prometheus text exposition, the labels in the
/// order Tandem's registry writes them (`job`, `rank`, `role`, then the family's); `None` when no
/// line has them. Label values here hold no quote, backslash or newline (the Python suite reads
/// escaped ones back with the Prometheus project's own parser).
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    let head = format!("{name}{{{}}} ", labels.join(","));
    let line = text.lines().find(|l| l.starts_with(&head))?;
    match &line[head.len()..] {
        "+Inf" => Some(f64::INFINITY),
        v => v.parse().ok(),
    }
}

/// The values of every sample of `name`, whatever its labels.
pub fn samples_of(text: &str, name: &str) -> Vec<f64> {
    let head = format!("{name}{{");
    text.lines()
        .filter(|l| l.starts_with(&head))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse().ok())
        .collect()
}
