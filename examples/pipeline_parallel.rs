//! Model parallelism by pipeline: the MLP's first layer lives on rank 0 and its second layer (and
//! the loss) on rank 1. Each step rank 0 sends the hidden activations forward, rank 1 sends the
//! gradient of the activations back, and each rank updates only its own layer, with point-to-point
//! `send`/`recv`. With one process both stages run in it, and the numbers are the same bit for bit.
//!
//! ```text
//! cargo build --release --example pipeline_parallel
//! tandem launch --nproc 2 -- target/release/examples/pipeline_parallel --steps 800
//! ```
//!
//! It reaches about 0.97 test accuracy.

use ndarray::{Array1, Array2, Axis};
use tandem::{Error, ProcessGroup, Result};
use tandem_examples::{Mlp, accuracy_of, batch, flag, spiral};

/// A dense layer's weights and bias.
struct Dense {
    w: Array2<f32>,
    b: Array1<f32>,
}

impl Dense {
    fn from_parts(w: &[f32], b: &[f32], rows: usize, cols: usize) -> Result<Dense> {
        let w = Array2::from_shape_vec((rows, cols), w.to_vec())
            .map_err(|e| Error::invalid("layer", e.to_string()))?;
        Ok(Dense {
            w,
            b: Array1::from(b.to_vec()),
        })
    }
    fn step(&mut self, gw: &Array2<f32>, gb: &Array1<f32>, lr: f32) {
        self.w.scaled_add(-lr, gw);
        self.b.scaled_add(-lr, gb);
    }
    fn checksum(&self) -> f64 {
        self.w
            .iter()
            .chain(self.b.iter())
            .map(|&v| f64::from(v))
            .sum()
    }
}

/// Stage 0, forward: the hidden activations.
fn hidden(l1: &Dense, x: &Array2<f32>) -> Array2<f32> {
    (x.dot(&l1.w) + &l1.b).mapv(|v| v.max(0.0))
}

/// Stage 1: loss, the gradient with respect to the activations, and the layer's own gradients.
fn head(l2: &Dense, h: &Array2<f32>, y: &[usize]) -> (f32, Array2<f32>, Array2<f32>, Array1<f32>) {
    let mut d = h.dot(&l2.w) + &l2.b;
    let n = y.len().max(1) as f32;
    let mut loss = 0.0;
    for (mut row, &label) in d.rows_mut().into_iter().zip(y) {
        let m = row.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        row.mapv_inplace(|v| (v - m).exp());
        let s = row.sum();
        row.mapv_inplace(|v| v / s);
        loss -= row[label].max(1e-12).ln();
        row[label] -= 1.0;
    }
    d /= n;
    (
        loss / n,
        d.dot(&l2.w.t()),
        h.t().dot(&d),
        d.sum_axis(Axis(0)),
    )
}

/// Stage 0, backward: the first layer's gradients from the activations' gradient (masked in place).
fn backward(x: &Array2<f32>, h: &Array2<f32>, dh: &mut Array2<f32>) -> (Array2<f32>, Array1<f32>) {
    dh.zip_mut_with(h, |g, &a| {
        if a <= 0.0 {
            *g = 0.0
        }
    });
    (x.t().dot(&*dh), dh.sum_axis(Axis(0)))
}

fn main() -> std::process::ExitCode {
    tandem_examples::report(run())
}

/// The example itself; `main` prints its error, if any, as a message.
fn run() -> Result<()> {
    let steps: usize = flag("--steps", 800);
    let (batch_size, lr, hidden_units) = (32, 0.5f32, 64);
    let pg = ProcessGroup::from_env()?;
    let (rank, world) = (pg.rank(), pg.world_size());
    if world > 2 {
        return Err(Error::invalid(
            "world size",
            format!("this model has two layers: run 1 or 2 processes, not {world}"),
        ));
    }
    let first = rank == 0; // holds layer 1
    let last = rank == world - 1; // holds layer 2 and the loss
    let init = Mlp::new(2, hidden_units, 3, 7);
    let parts = init.named(&init.params);
    let mut l1 = Dense::from_parts(parts[0].1, parts[1].1, 2, hidden_units)?;
    let mut l2 = Dense::from_parts(parts[2].1, parts[3].1, hidden_units, 3)?;
    let (x, y) = spiral(12_000, 1);
    let mut loss = f32::NAN;
    let mut h = Array2::<f32>::zeros((batch_size, hidden_units));
    let mut dh = Array2::<f32>::zeros((batch_size, hidden_units));
    for step in 0..steps {
        let at = (step * batch_size) % (x.nrows() - batch_size + 1);
        let (bx, by) = batch(&x, &y, at..at + batch_size);
        if first {
            h = hidden(&l1, &bx);
            if !last {
                pg.send(contiguous(&h)?, 1)?;
            }
        } else {
            pg.recv(contiguous_mut(&mut h)?, 0)?;
        }
        if last {
            let (l, grad_h, gw2, gb2) = head(&l2, &h, &by);
            loss = l;
            l2.step(&gw2, &gb2, lr);
            dh = grad_h;
            if !first {
                pg.send(contiguous(&dh)?, 0)?;
            }
        } else {
            pg.recv(contiguous_mut(&mut dh)?, 1)?;
        }
        if first {
            let (gw1, gb1) = backward(&bx, &h, &mut dh);
            l1.step(&gw1, &gb1, lr);
        }
    }
    // Evaluation runs through the same pipeline.
    let (tx, ty) = spiral(3_000, 2);
    let mut th = Array2::<f32>::zeros((tx.nrows(), hidden_units));
    if first {
        th = hidden(&l1, &tx);
        println!("stage 0: layer 1 checksum {:.9}", l1.checksum());
        if !last {
            pg.send(contiguous(&th)?, 1)?;
        }
    } else {
        pg.recv(contiguous_mut(&mut th)?, 0)?;
    }
    if last {
        let accuracy = accuracy_of(&(th.dot(&l2.w) + &l2.b), &ty);
        println!("stage {rank}: layer 2 checksum {:.9}", l2.checksum());
        println!(
            "pipeline over {world} process(es): final loss {loss:.9}, test accuracy {accuracy:.3}"
        );
    }
    pg.shutdown()
}

fn contiguous(a: &Array2<f32>) -> Result<&[f32]> {
    a.as_slice()
        .ok_or_else(|| Error::invalid("activations", "not contiguous"))
}

fn contiguous_mut(a: &mut Array2<f32>) -> Result<&mut [f32]> {
    a.as_slice_mut()
        .ok_or_else(|| Error::invalid("activations", "not contiguous"))
}
