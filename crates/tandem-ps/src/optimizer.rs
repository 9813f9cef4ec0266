//! Server-side optimizers, applied to one partition at a time with that partition's state.
//!
//! Why on the servers: a worker then pushes a gradient and pulls parameters, and never holds
//! optimizer state (Adam's two moments double a model's memory); the servers, which hold the
//! parameters anyway, hold it for their partitions only. Every rule (SGD, momentum, Nesterov,
//! Adagrad, Adam, AdamW, clipping, learning-rate decay) is written three ways that give the same
//! bits: whole (`apply`), in pieces (`apply_chunks`, for gradients read out of a worker's memory a
//! piece at a time; the clipping norm is computed first, over the whole gradient, in the same
//! order), and per row (`apply_rows`, sparse embedding updates that touch only those rows' state).

use tandem_core::{Error, Result};

/// Which update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `p -= lr * g`.
    Sgd,
    /// Heavy-ball momentum.
    Momentum,
    /// Nesterov momentum.
    Nesterov,
    /// Adagrad.
    Adagrad,
    /// Adam.
    Adam,
    /// Adam with decoupled weight decay.
    AdamW,
}

/// An optimizer and its hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Optimizer {
    /// The rule.
    pub kind: Kind,
    /// Learning rate.
    pub lr: f32,
    /// Momentum coefficient (momentum, Nesterov).
    pub momentum: f32,
    /// Adam's β₁.
    pub beta1: f32,
    /// Adam's β₂.
    pub beta2: f32,
    /// Denominator epsilon (Adagrad, Adam).
    pub eps: f32,
    /// L2 weight decay (added to the gradient; decoupled for AdamW).
    pub weight_decay: f32,
    /// Clip each partition's gradient to this L2 norm (0: off).
    pub clip_norm: f32,
    /// Learning-rate decay factor per `decay_steps` versions (1: constant).
    pub decay_rate: f32,
    /// Versions per decay (0: constant).
    pub decay_steps: u64,
}

impl Optimizer {
    /// An optimizer of `kind` at rate `lr` with every other setting at its default.
    fn base(kind: Kind, lr: f32) -> Self {
        Optimizer {
            kind,
            lr,
            momentum: 0.9,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            clip_norm: 0.0,
            decay_rate: 1.0,
            decay_steps: 0,
        }
    }
    /// Plain SGD.
    pub fn sgd(lr: f32) -> Self {
        Self::base(Kind::Sgd, lr)
    }
    /// Momentum SGD.
    pub fn momentum(lr: f32, momentum: f32) -> Self {
        Optimizer {
            momentum,
            ..Self::base(Kind::Momentum, lr)
        }
    }
    /// Nesterov momentum SGD.
    pub fn nesterov(lr: f32, momentum: f32) -> Self {
        Optimizer {
            momentum,
            ..Self::base(Kind::Nesterov, lr)
        }
    }
    /// Adagrad.
    pub fn adagrad(lr: f32) -> Self {
        Optimizer {
            eps: 1e-10,
            ..Self::base(Kind::Adagrad, lr)
        }
    }
    /// Adam with the usual defaults.
    pub fn adam(lr: f32) -> Self {
        Self::base(Kind::Adam, lr)
    }
    /// AdamW with `weight_decay`.
    pub fn adamw(lr: f32, weight_decay: f32) -> Self {
        Optimizer {
            weight_decay,
            ..Self::base(Kind::AdamW, lr)
        }
    }

    /// The rule's wire name.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            Kind::Sgd => "sgd",
            Kind::Momentum => "momentum",
            Kind::Nesterov => "nesterov",
            Kind::Adagrad => "adagrad",
            Kind::Adam => "adam",
            Kind::AdamW => "adamw",
        }
    }

    /// Parses a wire name.
    pub fn kind_from_name(name: &str) -> Result<Kind> {
        Ok(match name {
            "sgd" | "" => Kind::Sgd,
            "momentum" => Kind::Momentum,
            "nesterov" => Kind::Nesterov,
            "adagrad" => Kind::Adagrad,
            "adam" => Kind::Adam,
            "adamw" => Kind::AdamW,
            other => {
                return Err(Error::invalid(
                    "optimizer",
                    format!("unknown optimizer {other:?}"),
                ));
            }
        })
    }

    /// Checks the hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f32| {
            Error::invalid("optimizer", format!("{what} = {v} is out of range"))
        };
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(bad("lr", self.lr));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(bad("momentum", self.momentum));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return Err(bad("beta", self.beta1.max(self.beta2)));
        }
        let positive = |v: f32| v.is_finite() && v > 0.0;
        if !positive(self.eps)
            || self.weight_decay < 0.0
            || self.clip_norm < 0.0
            || !positive(self.decay_rate)
        {
            return Err(bad("eps/weight_decay/clip_norm/decay_rate", self.eps));
        }
        Ok(())
    }

    /// Learning rate at `version`.
    pub fn lr_at(&self, version: u64) -> f32 {
        match version.checked_div(self.decay_steps) {
            None => self.lr,
            Some(k) => self.lr * self.decay_rate.powf(k as f32),
        }
    }
}

/// Per-partition optimizer state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    /// First moment / momentum buffer.
    pub m: Vec<f32>,
    /// Second moment / Adagrad accumulator.
    pub v: Vec<f32>,
    /// Updates applied (Adam's bias correction).
    pub t: u64,
}

/// Applies one update to `params` from `grad` (which may be modified by clipping and decay).
pub fn apply(
    opt: &Optimizer,
    state: &mut State,
    params: &mut [f32],
    grad: &mut [f32],
    version: u64,
) {
    prepare(opt, state, params.len(), grad);
    let lr = opt.lr_at(version);
    update(opt, state.t, lr, params, grad, &mut state.m, &mut state.v);
}

/// Applies one update to `params` from a gradient that arrives in pieces: `fill(at, dst)` writes
/// gradient elements `at..at + dst.len()` into `dst` (a slice of `scratch`), and each piece is applied
/// before the next is fetched, so no partition-sized gradient buffer is needed. `norm_sq` is the
/// gradient's sum of squares, accumulated in element order (only used for clipping). The result is
/// bit-for-bit what [`apply`] gives on the whole gradient. If `fill` fails, the pieces before it have
/// been applied and its error is returned.
pub fn apply_chunks<E>(
    opt: &Optimizer,
    state: &mut State,
    params: &mut [f32],
    version: u64,
    norm_sq: f32,
    scratch: &mut [f32],
    mut fill: impl FnMut(usize, &mut [f32]) -> Result<(), E>,
) -> Result<(), E> {
    let n = params.len();
    let scale = clip_scale(opt, norm_sq);
    allocate_state(opt, state, n);
    state.t += 1;
    let lr = opt.lr_at(version);
    let piece = scratch.len().max(1);
    let mut at = 0;
    while at < n {
        let len = piece.min(n - at);
        let g = &mut scratch[..len];
        fill(at, g)?;
        if let Some(s) = scale {
            g.iter_mut().for_each(|x| *x *= s);
        }
        let r = at..at + len;
        let t = state.t;
        let (m, v) = state_of(state, r.clone());
        update(opt, t, lr, &mut params[r], g, m, v);
        at += len;
    }
    Ok(())
}

/// The factor clipping multiplies a gradient of squared norm `norm_sq` by, if any.
fn clip_scale(opt: &Optimizer, norm_sq: f32) -> Option<f32> {
    let norm = norm_sq.sqrt();
    (opt.clip_norm > 0.0 && norm > opt.clip_norm).then(|| opt.clip_norm / norm)
}

/// A gradient's sum of squares, continued from `acc` (in element order, as clipping computes it).
pub fn add_squares(acc: f32, grad: &[f32]) -> f32 {
    grad.iter().fold(acc, |a, g| a + g * g)
}

/// Applies a sparse update: for each `(row, grad)` only that row of `params` (rows of `row_len`)
/// and of the optimizer state changes. Rows repeated in `rows` must already be summed. Adam's bias
/// correction uses the partition's update count ("lazy Adam"), as embedding tables usually do.
pub fn apply_rows(
    opt: &Optimizer,
    state: &mut State,
    params: &mut [f32],
    row_len: usize,
    rows: &mut [(usize, Vec<f32>)],
    version: u64,
) {
    let mut all: Vec<f32> = rows.iter().flat_map(|(_, g)| g.iter().copied()).collect();
    prepare(opt, state, params.len(), &mut all);
    let lr = opt.lr_at(version);
    for (k, (row, _)) in rows.iter().enumerate() {
        let r = row * row_len..(row + 1) * row_len;
        let g = &mut all[k * row_len..(k + 1) * row_len];
        if opt.weight_decay > 0.0 && opt.kind != Kind::AdamW {
            g.iter_mut()
                .zip(&params[r.clone()])
                .for_each(|(g, p)| *g += opt.weight_decay * p);
        }
        let t = state.t;
        let (m, v) = state_of(state, r.clone());
        update_slices(opt, t, lr, &mut params[r], g, m, v);
    }
}

/// The optimizer state of elements `r` (empty slices for state the optimizer does not keep).
fn state_of(state: &mut State, r: std::ops::Range<usize>) -> (&mut [f32], &mut [f32]) {
    let m = if state.m.is_empty() {
        &mut [][..]
    } else {
        &mut state.m[r.clone()]
    };
    let v = if state.v.is_empty() {
        &mut [][..]
    } else {
        &mut state.v[r]
    };
    (m, v)
}

/// Clips, allocates state and counts the update; weight decay for dense updates is added in `update`.
fn prepare(opt: &Optimizer, state: &mut State, n: usize, grad: &mut [f32]) {
    if opt.clip_norm > 0.0
        && let Some(s) = clip_scale(opt, add_squares(0.0, grad))
    {
        grad.iter_mut().for_each(|g| *g *= s);
    }
    allocate_state(opt, state, n);
    state.t += 1;
}

/// Optimizer state for a partition of `n` elements, allocated on the first update.
fn allocate_state(opt: &Optimizer, state: &mut State, n: usize) {
    if state.m.len() != n
        && matches!(
            opt.kind,
            Kind::Momentum | Kind::Nesterov | Kind::Adam | Kind::AdamW
        )
    {
        state.m = vec![0.0; n];
    }
    if state.v.len() != n && matches!(opt.kind, Kind::Adagrad | Kind::Adam | Kind::AdamW) {
        state.v = vec![0.0; n];
    }
}

/// One step of `opt` on `params` (L2 weight decay folded into the gradient first, except for
/// AdamW, which decays the weights itself).
fn update(
    opt: &Optimizer,
    t: u64,
    lr: f32,
    params: &mut [f32],
    grad: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    if opt.weight_decay > 0.0 && opt.kind != Kind::AdamW {
        grad.iter_mut()
            .zip(params.iter())
            .for_each(|(g, p)| *g += opt.weight_decay * p);
    }
    update_slices(opt, t, lr, params, grad, m, v);
}

/// The optimizer's update rule on equal-length slices of parameters, gradient and state.
fn update_slices(
    opt: &Optimizer,
    t: u64,
    lr: f32,
    params: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    match opt.kind {
        Kind::Sgd => params
            .iter_mut()
            .zip(grad.iter())
            .for_each(|(p, g)| *p -= lr * g),
        Kind::Momentum | Kind::Nesterov => {
            let mu = opt.momentum;
            let nesterov = opt.kind == Kind::Nesterov;
            for ((p, g), m) in params.iter_mut().zip(grad.iter()).zip(m.iter_mut()) {
                *m = mu * *m + g;
                *p -= lr * if nesterov { g + mu * *m } else { *m };
            }
        }
        Kind::Adagrad => {
            for ((p, g), v) in params.iter_mut().zip(grad.iter()).zip(v.iter_mut()) {
                *v += g * g;
                *p -= lr * g / (v.sqrt() + opt.eps);
            }
        }
        Kind::Adam | Kind::AdamW => {
            let (b1, b2) = (opt.beta1, opt.beta2);
            let c1 = 1.0 - b1.powi(t.min(i32::MAX as u64) as i32);
            let c2 = 1.0 - b2.powi(t.min(i32::MAX as u64) as i32);
            let decoupled = if opt.kind == Kind::AdamW {
                opt.weight_decay
            } else {
                0.0
            };
            for (((p, g), m), v) in params
                .iter_mut()
                .zip(grad.iter())
                .zip(m.iter_mut())
                .zip(v.iter_mut())
            {
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                let update = (*m / c1) / ((*v / c2).sqrt() + opt.eps);
                *p -= lr * (update + decoupled * *p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Adam written out in f64 from the paper, for comparison.
    fn adam_reference(p0: &[f64], grads: &[Vec<f64>], lr: f64, wd: f64) -> Vec<f64> {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let mut p = p0.to_vec();
        let mut m = vec![0.0; p.len()];
        let mut v = vec![0.0; p.len()];
        for (t, g) in grads.iter().enumerate() {
            let t = t as i32 + 1;
            for i in 0..p.len() {
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let mh = m[i] / (1.0 - b1.powi(t));
                let vh = v[i] / (1.0 - b2.powi(t));
                p[i] -= lr * (mh / (vh.sqrt() + eps) + wd * p[i]);
            }
        }
        p
    }

    #[test]
    fn adam_and_adamw_match_the_reference() {
        let p0 = [0.5f32, -1.0, 2.0];
        let grads: Vec<Vec<f32>> = (0..50)
            .map(|k| vec![0.1 * k as f32, -0.3, (k % 7) as f32 - 3.0])
            .collect();
        for (opt, wd) in [
            (Optimizer::adam(0.01), 0.0),
            (Optimizer::adamw(0.01, 0.1), 0.1),
        ] {
            let mut p = p0.to_vec();
            let mut st = State::default();
            for (k, g) in grads.iter().enumerate() {
                apply(&opt, &mut st, &mut p, &mut g.clone(), k as u64);
            }
            let gr: Vec<Vec<f64>> = grads
                .iter()
                .map(|g| g.iter().map(|&x| x as f64).collect())
                .collect();
            let want = adam_reference(&p0.map(|x| x as f64), &gr, 0.01, wd);
            for (a, b) in p.iter().zip(&want) {
                assert!((*a as f64 - b).abs() < 1e-4, "{p:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn sparse_rows_change_only_those_rows_and_match_dense_on_them() {
        // Adagrad on rows 1 and 3 of a 4x2 table equals dense Adagrad on those rows alone.
        let opt = Optimizer::adagrad(0.5);
        let mut table = vec![1.0f32; 8];
        let mut st = State::default();
        let mut rows = vec![(1usize, vec![0.5f32, -1.0]), (3, vec![2.0, 0.25])];
        apply_rows(&opt, &mut st, &mut table, 2, &mut rows, 0);
        let mut dense_row1 = vec![1.0f32, 1.0];
        apply(
            &opt,
            &mut State::default(),
            &mut dense_row1,
            &mut [0.5, -1.0],
            0,
        );
        assert_eq!(&table[2..4], &dense_row1[..]);
        assert_eq!(&table[0..2], &[1.0, 1.0]);
        assert_eq!(&table[4..6], &[1.0, 1.0]);
        assert_eq!(st.v[0], 0.0, "state of untouched rows is untouched");
        assert_eq!(st.v[2], 0.25);
    }

    #[test]
    fn sgd_momentum_nesterov_adagrad_clip_decay() {
        let mut p = vec![1.0f32];
        apply(
            &Optimizer::sgd(0.5),
            &mut State::default(),
            &mut p,
            &mut [2.0],
            0,
        );
        assert_eq!(p, [0.0]);
        let (mut p, mut st) = (vec![0.0f32], State::default());
        let opt = Optimizer::momentum(1.0, 0.5);
        apply(&opt, &mut st, &mut p, &mut [1.0], 0);
        apply(&opt, &mut st, &mut p, &mut [1.0], 1);
        assert_eq!(p, [-2.5]); // m: 1, then 1.5
        let (mut p, mut st) = (vec![0.0f32], State::default());
        apply(
            &Optimizer::nesterov(1.0, 0.5),
            &mut st,
            &mut p,
            &mut [1.0],
            0,
        );
        assert_eq!(p, [-1.5]);
        let (mut p, mut st) = (vec![0.0f32], State::default());
        apply(&Optimizer::adagrad(1.0), &mut st, &mut p, &mut [2.0], 0);
        assert!((p[0] + 1.0).abs() < 1e-6);
        let mut clip = Optimizer::sgd(1.0);
        clip.clip_norm = 1.0;
        let mut p = vec![0.0f32, 0.0];
        apply(&clip, &mut State::default(), &mut p, &mut [3.0, 4.0], 0);
        assert!((p[0] + 0.6).abs() < 1e-6 && (p[1] + 0.8).abs() < 1e-6);
        let mut decay = Optimizer::sgd(1.0);
        decay.decay_rate = 0.5;
        decay.decay_steps = 10;
        assert_eq!(decay.lr_at(25), 0.25);
        assert!(Optimizer::sgd(-1.0).validate().is_err());
        assert!(Optimizer::momentum(0.1, 1.5).validate().is_err());
    }

    #[test]
    fn chunked_updates_are_bit_for_bit_the_whole_update() {
        // Deterministic pseudo-random values (an LCG), signs and magnitudes mixed.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
        };
        let n = 1000;
        let mut opts = vec![
            Optimizer::sgd(0.1),
            Optimizer::momentum(0.1, 0.9),
            Optimizer::nesterov(0.1, 0.9),
            Optimizer::adagrad(0.1),
            Optimizer::adam(0.01),
            Optimizer::adamw(0.01, 0.1),
        ];
        let mut clipped = Optimizer::adam(0.01);
        clipped.clip_norm = 1.0;
        clipped.weight_decay = 0.01;
        opts.push(clipped);
        for opt in opts {
            let p0: Vec<f32> = (0..n).map(|_| next()).collect();
            let (mut whole, mut pieces) = (p0.clone(), p0);
            let (mut sw, mut sp) = (State::default(), State::default());
            for version in 0..3 {
                let g: Vec<f32> = (0..n).map(|_| next()).collect();
                apply(&opt, &mut sw, &mut whole, &mut g.clone(), version);
                let norm_sq = add_squares(add_squares(0.0, &g[..300]), &g[300..]);
                let mut scratch = vec![0.0f32; 7];
                apply_chunks(
                    &opt,
                    &mut sp,
                    &mut pieces,
                    version,
                    norm_sq,
                    &mut scratch,
                    |at, dst| {
                        dst.copy_from_slice(&g[at..at + dst.len()]);
                        Ok::<(), ()>(())
                    },
                )
                .unwrap();
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&whole), bits(&pieces), "{:?}", opt.kind);
            assert_eq!(bits(&sw.m), bits(&sp.m));
            assert_eq!(bits(&sw.v), bits(&sp.v));
            assert_eq!(sw.t, sp.t);
        }
    }

    #[test]
    fn a_failed_piece_stops_the_update_there() {
        let mut p = vec![1.0f32; 10];
        let mut scratch = vec![0.0f32; 4];
        let r = apply_chunks(
            &Optimizer::sgd(1.0),
            &mut State::default(),
            &mut p,
            0,
            10.0,
            &mut scratch,
            |at, dst| {
                if at >= 4 {
                    return Err("gone");
                }
                dst.fill(1.0);
                Ok(())
            },
        );
        assert_eq!(r, Err("gone"));
        assert_eq!(&p[..4], &[0.0; 4]);
        assert_eq!(&p[4..], &[1.0; 6]);
    }
}
