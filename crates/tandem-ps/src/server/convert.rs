//! Turning a worker's declaration into the server's types. Everything here comes from the wire, so
//! every size is computed with checked arithmetic: a declaration whose rows, shape or offsets
//! overflow is refused with a message naming the field, never wrapped or panicked on.

use tonic::Status;

use super::mode::{MAX_WORKERS, Mode};
use crate::failure::invalid;
use crate::init::Init;
use crate::optimizer::{Kind, Optimizer};
use crate::pb;
use crate::protocol::Key;

/// Largest partition a server accepts, in elements (64 GiB of f32).
pub const MAX_PARTITION_ELEMENTS: u64 = 1 << 34;

/// One partition as the model allocates it: key, full shape, first row, rows, initializer.
pub type Declared = (Key, Vec<u64>, u64, u64, Init);

/// The optimizer a declaration names, checked.
pub fn optimizer_from(o: Option<pb::Optimizer>) -> Result<Optimizer, Status> {
    let o = o.ok_or_else(|| invalid("declaration has no optimizer"))?;
    let kind = Optimizer::kind_from_name(&o.kind).map_err(|e| invalid(e.to_string()))?;
    let mut opt = match kind {
        Kind::Sgd => Optimizer::sgd(o.lr as f32),
        Kind::Momentum => Optimizer::momentum(o.lr as f32, o.momentum as f32),
        Kind::Nesterov => Optimizer::nesterov(o.lr as f32, o.momentum as f32),
        Kind::Adagrad => Optimizer::adagrad(o.lr as f32),
        Kind::Adam => Optimizer::adam(o.lr as f32),
        Kind::AdamW => Optimizer::adamw(o.lr as f32, o.weight_decay as f32),
    };
    if o.beta1 > 0.0 {
        opt.beta1 = o.beta1 as f32;
    }
    if o.beta2 > 0.0 {
        opt.beta2 = o.beta2 as f32;
    }
    if o.eps > 0.0 {
        opt.eps = o.eps as f32;
    }
    opt.weight_decay = o.weight_decay as f32;
    opt.clip_norm = o.clip_norm as f32;
    if o.decay_steps > 0 {
        opt.decay_rate = o.decay_rate as f32;
        opt.decay_steps = o.decay_steps;
    }
    opt.validate().map_err(|e| invalid(e.to_string()))?;
    Ok(opt)
}

/// The training mode a declaration names, checked.
pub fn mode_from(m: Option<pb::Mode>) -> Result<Mode, Status> {
    let m = m.ok_or_else(|| invalid("declaration has no mode"))?;
    if m.workers == 0 {
        return Err(invalid("mode.workers must be at least 1"));
    }
    if m.workers > MAX_WORKERS {
        return Err(invalid(format!(
            "mode.workers {} exceeds the {MAX_WORKERS} a server keeps",
            m.workers
        )));
    }
    let k = if m.replicas_to_aggregate == 0 {
        m.workers
    } else {
        m.replicas_to_aggregate
    };
    if k > m.workers {
        return Err(invalid(format!(
            "replicas_to_aggregate {k} exceeds the {} workers",
            m.workers
        )));
    }
    Ok(Mode {
        sync: m.sync,
        workers: m.workers,
        replicas_to_aggregate: k,
        staleness: m.bounded.then_some(m.staleness),
        reject_non_finite: m.reject_non_finite,
    })
}

/// One partition of a declaration, checked: f32, rows inside the parameter, sizes that neither
/// overflow nor exceed [`MAX_PARTITION_ELEMENTS`], a known initializer.
pub fn partition_from(p: pb::Partition) -> Result<Declared, Status> {
    let name = format!("parameter {:?} partition {}", p.param, p.part);
    if p.dtype != "f32" {
        return Err(invalid(format!(
            "{name}: only f32 parameters are supported, got {}",
            p.dtype
        )));
    }
    let rows_total = p.shape.first().copied().unwrap_or(1);
    let end = p.row_start.checked_add(p.rows).ok_or_else(|| {
        invalid(format!(
            "{name}: row_start {} + rows {} overflows",
            p.row_start, p.rows
        ))
    })?;
    if p.rows == 0 || end > rows_total {
        return Err(invalid(format!(
            "{name}: rows {}..{end} are not inside the parameter's {rows_total} rows",
            p.row_start
        )));
    }
    let row_len = p
        .shape
        .iter()
        .skip(1)
        .try_fold(1u64, |acc, d| acc.checked_mul(*d))
        .ok_or_else(|| invalid(format!("{name}: shape {:?} overflows", p.shape)))?;
    // The whole parameter's size bounds both this partition's and its first element's offset.
    let total = rows_total
        .checked_mul(row_len)
        .filter(|n| usize::try_from(*n).is_ok())
        .ok_or_else(|| {
            invalid(format!(
                "{name}: shape {:?} has more elements than this machine can address",
                p.shape
            ))
        })?;
    let numel = p.rows.saturating_mul(row_len);
    if numel > MAX_PARTITION_ELEMENTS {
        return Err(invalid(format!(
            "{name} is too large: {numel} elements (at most {MAX_PARTITION_ELEMENTS} per partition)"
        )));
    }
    debug_assert!(numel <= total);
    let init = p.init.unwrap_or_default();
    let init = Init::from_wire(&init.kind, init.a, init.b, init.seed)
        .map_err(|e| invalid(format!("{name}: {e}")))?;
    Ok(((p.param, p.part), p.shape, p.row_start, p.rows, init))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::reason_of;
    use crate::pb::Reason;

    fn part(shape: Vec<u64>, row_start: u64, rows: u64) -> pb::Partition {
        pb::Partition {
            param: "w".into(),
            part: 0,
            shape,
            row_start,
            rows,
            dtype: "f32".into(),
            init: None,
        }
    }

    fn refused(p: pb::Partition) -> String {
        match partition_from(p) {
            Ok(_) => panic!("accepted"),
            Err(st) => {
                assert_eq!(reason_of(&st), Reason::Invalid);
                st.message().to_string()
            }
        }
    }

    #[test]
    fn the_number_of_workers_is_bounded_on_both_sides() {
        let mode = |workers| {
            mode_from(Some(pb::Mode {
                sync: true,
                workers,
                ..Default::default()
            }))
        };
        assert_eq!(
            mode(MAX_WORKERS).expect("at the bound").workers,
            MAX_WORKERS
        );
        assert_eq!(mode(1).expect("one").workers, 1);
        for bad in [0, MAX_WORKERS + 1, u32::MAX] {
            let st = mode(bad).expect_err("out of bounds");
            assert_eq!(reason_of(&st), Reason::Invalid, "{bad}");
            assert!(
                st.message().contains("mode.workers"),
                "{bad}: {}",
                st.message()
            );
        }
    }

    #[test]
    fn declarations_whose_sizes_overflow_are_refused_naming_the_field() {
        let m = refused(part(vec![u64::MAX], u64::MAX, 2));
        assert!(m.contains("overflows") && m.contains("row_start"), "{m}");
        let m = refused(part(vec![4, u64::MAX, 3], 0, 4));
        assert!(m.contains("shape") && m.contains("overflows"), "{m}");
        let m = refused(part(vec![u64::MAX / 2, 4], 0, 1));
        assert!(m.contains("more elements than this machine"), "{m}");
        let m = refused(part(vec![1 << 20, 1 << 15], 0, 1 << 20));
        assert!(m.contains("too large"), "{m}");
        let m = refused(part(vec![10, 2], 5, 6));
        assert!(m.contains("not inside"), "{m}");
        let m = refused(part(vec![10, 2], 0, 0));
        assert!(m.contains("not inside"), "{m}");
    }

    #[test]
    fn declarations_at_the_limits_are_accepted() {
        // The last rows, exactly.
        assert!(partition_from(part(vec![10, 2], 4, 6)).is_ok());
        // Exactly the largest partition (not allocated here).
        assert!(partition_from(part(vec![1 << 20, 1 << 14], 0, 1 << 20)).is_ok());
        // A scalar (no shape) is one row of one element.
        let (_, _, start, rows, _) = partition_from(part(vec![], 0, 1)).expect("scalar");
        assert_eq!((start, rows), (0, 1));
        let mut p = part(vec![3], 0, 3);
        p.dtype = "f64".into();
        assert!(refused(p).contains("only f32"));
    }

    #[test]
    fn modes_are_checked() {
        let mode = |workers, k| {
            mode_from(Some(pb::Mode {
                sync: true,
                workers,
                replicas_to_aggregate: k,
                ..Default::default()
            }))
        };
        assert!(mode(0, 0).is_err());
        assert!(mode(2, 3).is_err());
        assert_eq!(mode(2, 2).map(|m| m.replicas_to_aggregate).ok(), Some(2));
        assert_eq!(mode(3, 0).map(|m| m.replicas_to_aggregate).ok(), Some(3));
        assert!(mode_from(None).is_err());
    }

    #[test]
    fn optimizer_settings_override_defaults_only_when_given() {
        let wire = |beta1: f64, beta2: f64, eps: f64, decay_steps: u64| pb::Optimizer {
            kind: "adam".into(),
            lr: 0.01,
            beta1,
            beta2,
            eps,
            decay_rate: 0.5,
            decay_steps,
            ..Default::default()
        };
        let d = Optimizer::adam(0.01);
        let o = optimizer_from(Some(wire(0.0, 0.0, 0.0, 0))).expect("defaults");
        assert_eq!((o.beta1, o.beta2, o.eps), (d.beta1, d.beta2, d.eps));
        assert_eq!((o.decay_steps, o.decay_rate), (d.decay_steps, d.decay_rate));
        let o = optimizer_from(Some(wire(0.5, 0.75, 1e-3, 10))).expect("given");
        assert_eq!((o.beta1, o.beta2, o.eps), (0.5, 0.75, 1e-3));
        assert_eq!((o.decay_steps, o.decay_rate), (10, 0.5));
        assert!(optimizer_from(None).is_err());
        let mut bad = wire(0.0, 0.0, 0.0, 0);
        bad.kind = "lbfgs".into();
        assert_eq!(
            reason_of(&optimizer_from(Some(bad)).expect_err("unknown")),
            Reason::Invalid
        );
    }
}
