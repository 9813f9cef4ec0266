//! A small multi-layer perceptron in `ndarray` and the data it learns, for the demo: a 2-D, 3-class
//! spiral that no linear model separates.
//!
//! Why a hand-written MLP: the demo must train a real model in every job shape (parameter servers
//! and allreduce) with no framework to install, and its gradients are flat `f32` slices, exactly
//! what Tandem moves. The spiral needs the hidden layer: a linear model stays near chance on it.

use ndarray::{Array1, Array2, Axis, s};

/// A deterministic pseudo-random stream (splitmix64), so every rank generates the same data.
pub struct Rng(u64);

impl Rng {
    /// A stream from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u = self.uniform().max(1e-7);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

/// `n` points of a 3-arm spiral with noise: features `[n, 2]`, labels in 0..3.
pub fn spiral(n: usize, seed: u64) -> (Array2<f32>, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let mut x = Array2::zeros((n, 2));
    let mut y = Vec::with_capacity(n);
    for i in 0..n {
        let class = i % 3;
        let r = rng.uniform();
        let theta = class as f32 * 2.0 * std::f32::consts::PI / 3.0 + r * 4.0 + rng.normal() * 0.25;
        x[[i, 0]] = r * theta.cos();
        x[[i, 1]] = r * theta.sin();
        y.push(class);
    }
    (x, y)
}

/// Two dense layers with a ReLU between them, parameters kept in one flat vector so one collective
/// (or one parameter-server call) moves them all.
pub struct Mlp {
    /// Inputs, hidden units, classes.
    pub dims: (usize, usize, usize),
    /// `w1 [i*h] | b1 [h] | w2 [h*c] | b2 [c]`.
    pub params: Vec<f32>,
}

impl Mlp {
    /// He-initialised weights from `seed`.
    pub fn new(inputs: usize, hidden: usize, classes: usize, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let n = inputs * hidden + hidden + hidden * classes + classes;
        let mut params = vec![0.0; n];
        let s1 = (2.0 / inputs as f32).sqrt();
        let s2 = (2.0 / hidden as f32).sqrt();
        for (i, p) in params.iter_mut().enumerate() {
            if i < inputs * hidden {
                *p = rng.normal() * s1;
            } else if (inputs * hidden + hidden..inputs * hidden + hidden + hidden * classes)
                .contains(&i)
            {
                *p = rng.normal() * s2;
            }
        }
        Mlp {
            dims: (inputs, hidden, classes),
            params,
        }
    }

    /// The named parts of the flat parameter vector, with their shapes and the standard deviation
    /// of their He initialisation (0 for biases): how a parameter server declares this model.
    pub fn layers(&self) -> [(&'static str, Vec<usize>, f32); 4] {
        let (i, h, c) = self.dims;
        [
            ("w1", vec![i, h], (2.0 / i as f32).sqrt()),
            ("b1", vec![h], 0.0),
            ("w2", vec![h, c], (2.0 / h as f32).sqrt()),
            ("b2", vec![c], 0.0),
        ]
    }

    /// Cuts a flat vector in [`Mlp::params`]' layout (parameters or gradients) into the named
    /// parts of [`Mlp::layers`].
    pub fn named<'a>(&self, flat: &'a [f32]) -> Vec<(&'static str, &'a [f32])> {
        let mut rest = flat;
        self.layers()
            .into_iter()
            .map(|(name, shape, _)| {
                let n: usize = shape.iter().product();
                let (part, tail) = rest.split_at(n.min(rest.len()));
                rest = tail;
                (name, part)
            })
            .collect()
    }

    /// Replaces the parameters with named parts (as pulled from parameter servers); a missing or
    /// wrongly sized part leaves the parameters unchanged and returns its name.
    pub fn load_named(
        &mut self,
        parts: &std::collections::HashMap<String, Vec<f32>>,
    ) -> Result<(), &'static str> {
        let mut flat = Vec::with_capacity(self.params.len());
        for (name, shape, _) in self.layers() {
            let n: usize = shape.iter().product();
            match parts.get(name) {
                Some(v) if v.len() == n => flat.extend_from_slice(v),
                _ => return Err(name),
            }
        }
        self.params = flat;
        Ok(())
    }

    /// The flat parameters as the two layers' weights and biases.
    fn split(&self, p: &[f32]) -> (Array2<f32>, Array1<f32>, Array2<f32>, Array1<f32>) {
        let (i, h, c) = self.dims;
        let (w1, rest) = p.split_at(i * h);
        let (b1, rest) = rest.split_at(h);
        let (w2, b2) = rest.split_at(h * c);
        (
            Array2::from_shape_vec((i, h), w1.to_vec()).unwrap_or_else(|_| Array2::zeros((i, h))),
            Array1::from(b1.to_vec()),
            Array2::from_shape_vec((h, c), w2.to_vec()).unwrap_or_else(|_| Array2::zeros((h, c))),
            Array1::from(b2.to_vec()),
        )
    }

    /// The hidden activations (ReLU) and the logits of a batch.
    fn forward(&self, x: &Array2<f32>) -> (Array2<f32>, Array2<f32>) {
        let (w1, b1, w2, b2) = self.split(&self.params);
        let hidden = (x.dot(&w1) + &b1).mapv(|v| v.max(0.0));
        let logits = hidden.dot(&w2) + &b2;
        (hidden, logits)
    }

    /// Row-wise softmax, stable (each row's maximum subtracted first).
    fn softmax(logits: &Array2<f32>) -> Array2<f32> {
        let mut p = logits.clone();
        for mut row in p.rows_mut() {
            let m = row.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            row.mapv_inplace(|v| (v - m).exp());
            let sum = row.sum();
            row.mapv_inplace(|v| v / sum);
        }
        p
    }

    /// Mean cross-entropy loss and its gradient (flat, same layout as `params`) on one batch.
    pub fn loss_and_grad(&self, x: &Array2<f32>, y: &[usize]) -> (f32, Vec<f32>) {
        let n = x.nrows().max(1) as f32;
        let (_, hdim, _) = self.dims;
        let (hidden, logits) = self.forward(x);
        let mut d = Self::softmax(&logits);
        let mut loss = 0.0;
        for (i, &label) in y.iter().enumerate() {
            loss -= d[[i, label]].max(1e-12).ln();
            d[[i, label]] -= 1.0;
        }
        d /= n;
        let (_, _, w2, _) = self.split(&self.params);
        let gw2 = hidden.t().dot(&d);
        let gb2 = d.sum_axis(Axis(0));
        let mut dh = d.dot(&w2.t());
        dh.zip_mut_with(&hidden, |g, &h| {
            if h <= 0.0 {
                *g = 0.0
            }
        });
        let gw1 = x.t().dot(&dh);
        let gb1 = dh.sum_axis(Axis(0));
        let mut g = Vec::with_capacity(self.params.len());
        g.extend(gw1.iter());
        g.extend(gb1.iter());
        debug_assert_eq!(gw2.ncols() * hdim, gw2.len());
        g.extend(gw2.iter());
        g.extend(gb2.iter());
        (loss / n, g)
    }

    /// Fraction of `x` classified as `y`.
    pub fn accuracy(&self, x: &Array2<f32>, y: &[usize]) -> f32 {
        accuracy_of(&self.forward(x).1, y)
    }

    /// Replaces the parameters with the named parts pulled from parameter servers; names the
    /// parameter that is missing or wrongly sized.
    pub fn load_pulled(
        &mut self,
        parts: &std::collections::HashMap<String, Vec<f32>>,
    ) -> tandem::Result<()> {
        self.load_named(parts).map_err(|name| {
            tandem::Error::invalid(
                "pull",
                format!("parameter {name} is missing or has the wrong size"),
            )
        })
    }
}

/// Fraction of rows of `logits` whose largest entry is at the row's label.
pub fn accuracy_of(logits: &Array2<f32>, y: &[usize]) -> f32 {
    let right = logits
        .rows()
        .into_iter()
        .zip(y)
        .filter(|(row, label)| {
            let best = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                );
            best.0 == **label
        })
        .count();
    right as f32 / y.len().max(1) as f32
}

/// Rows `range` of `x` and the matching labels.
pub fn batch(
    x: &Array2<f32>,
    y: &[usize],
    range: std::ops::Range<usize>,
) -> (Array2<f32>, Vec<usize>) {
    (x.slice(s![range.clone(), ..]).to_owned(), y[range].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_matches_finite_differences() {
        let (x, y) = spiral(30, 7);
        let mut m = Mlp::new(2, 5, 3, 1);
        let (_, g) = m.loss_and_grad(&x, &y);
        for idx in [0, 3, 11, 17, 22, m.params.len() - 1] {
            let h = 1e-2;
            m.params[idx] += h;
            let (lp, _) = m.loss_and_grad(&x, &y);
            m.params[idx] -= 2.0 * h;
            let (lm, _) = m.loss_and_grad(&x, &y);
            m.params[idx] += h;
            let numeric = (lp - lm) / (2.0 * h);
            assert!(
                (numeric - g[idx]).abs() < 2e-2,
                "param {idx}: numeric {numeric} vs analytic {}",
                g[idx]
            );
        }
    }

    #[test]
    fn a_single_process_learns_the_spiral() {
        let (x, y) = spiral(1500, 3);
        let mut m = Mlp::new(2, 64, 3, 1);
        for step in 0..600 {
            let lo = (step * 100) % 1500;
            let (bx, by) = batch(&x, &y, lo..lo + 100);
            let (_, g) = m.loss_and_grad(&bx, &by);
            m.params.iter_mut().zip(&g).for_each(|(p, g)| *p -= 0.5 * g);
        }
        assert!(m.accuracy(&x, &y) > 0.9, "accuracy {}", m.accuracy(&x, &y));
    }
}
