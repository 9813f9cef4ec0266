//! What survives a membership change: named arrays and scalars, committed in memory.

use std::collections::BTreeMap;

use tandem_collective::ProcessGroup;
use tandem_core::{Error, ReduceOp, Result};

/// A training state that survives the loss of processes: named `f32` arrays (parameters,
/// optimizer slots) and `f64` scalars (step, learning rate). [`State::commit`] keeps a copy in
/// memory; after a membership change the run restores the last commit and every member adopts the
/// state of the member with the most commits (so a member that missed the last commit, or a
/// newcomer, catches up).
///
/// ```
/// let mut s = tandem_elastic::State::new().with_array("w", vec![0.0; 4]).with_scalar("step", 0.0);
/// s.array_mut("w").unwrap()[0] = 1.0;
/// s.commit();
/// s.array_mut("w").unwrap()[0] = 2.0;
/// s.restore();
/// assert_eq!(s.array("w").unwrap()[0], 1.0);
/// ```
#[derive(Debug, Clone, Default)]
pub struct State {
    arrays: BTreeMap<String, Vec<f32>>,
    scalars: BTreeMap<String, f64>,
    saved: (BTreeMap<String, Vec<f32>>, BTreeMap<String, f64>),
    commits: u64,
}

/// Makes `dst` equal to `src`, copying into the arrays `dst` already has (a commit of a large
/// state is then a copy, not an allocation whose pages the kernel zeroes every time).
fn copy_arrays(dst: &mut BTreeMap<String, Vec<f32>>, src: &BTreeMap<String, Vec<f32>>) {
    dst.retain(|k, _| src.contains_key(k));
    for (k, v) in src {
        match dst.get_mut(k) {
            Some(d) if d.len() == v.len() => d.copy_from_slice(v),
            Some(d) => d.clone_from(v),
            None => {
                dst.insert(k.clone(), v.clone());
            }
        }
    }
}

impl State {
    /// An empty state.
    pub fn new() -> State {
        State::default()
    }

    /// Adds an array (its value is also the first commit's).
    pub fn with_array(mut self, name: &str, value: Vec<f32>) -> State {
        self.saved.0.insert(name.to_string(), value.clone());
        self.arrays.insert(name.to_string(), value);
        self
    }

    /// Adds a scalar (its value is also the first commit's).
    pub fn with_scalar(mut self, name: &str, value: f64) -> State {
        self.saved.1.insert(name.to_string(), value);
        self.scalars.insert(name.to_string(), value);
        self
    }

    /// An array.
    pub fn array(&self, name: &str) -> Option<&[f32]> {
        self.arrays.get(name).map(Vec::as_slice)
    }

    /// An array, to change.
    pub fn array_mut(&mut self, name: &str) -> Option<&mut [f32]> {
        self.arrays.get_mut(name).map(Vec::as_mut_slice)
    }

    /// A scalar.
    pub fn scalar(&self, name: &str) -> Option<f64> {
        self.scalars.get(name).copied()
    }

    /// Sets a scalar (adding it if new).
    pub fn set_scalar(&mut self, name: &str, value: f64) {
        self.scalars.insert(name.to_string(), value);
    }

    /// How many times this state was committed (or adopted from a member that had committed more).
    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// Keeps a copy of the current values in memory: what [`State::restore`] returns to.
    pub fn commit(&mut self) {
        copy_arrays(&mut self.saved.0, &self.arrays);
        self.saved.1.clone_from(&self.scalars);
        self.commits += 1;
    }

    /// Returns to the last commit.
    pub fn restore(&mut self) {
        copy_arrays(&mut self.arrays, &self.saved.0);
        self.scalars.clone_from(&self.saved.1);
    }

    /// Makes every member of `group` hold the committed state of the member with the most commits
    /// (the lowest rank among them): what a restored survivor or a newcomer needs before training
    /// together. The arrays and scalars must have the same names and lengths everywhere.
    pub fn sync(&mut self, group: &ProcessGroup) -> Result<()> {
        if group.world_size() == 1 {
            return Ok(());
        }
        let mut most = [self.commits as i64];
        group.allreduce(&mut most, ReduceOp::Max)?;
        let mut root = [if self.commits as i64 == most[0] {
            group.rank() as i64
        } else {
            i64::MAX
        }];
        group.allreduce(&mut root, ReduceOp::Min)?;
        let root = root[0] as usize;
        // Same layout everywhere, checked before any value moves.
        let mut shape: Vec<i64> = self.arrays.values().map(|a| a.len() as i64).collect();
        shape.push(self.scalars.len() as i64);
        let mut theirs = shape.clone();
        group.broadcast(&mut theirs, root)?;
        if theirs != shape {
            return Err(Error::invalid(
                "elastic state",
                format!(
                    "rank {} holds arrays of lengths {:?} (and {} scalars) but rank {root} holds {:?}: every process must build the same State",
                    group.rank(),
                    &shape[..shape.len() - 1],
                    self.scalars.len(),
                    theirs
                ),
            ));
        }
        for a in self.saved.0.values_mut() {
            group.broadcast(a, root)?;
        }
        let mut scalars: Vec<f64> = self.saved.1.values().copied().collect();
        group.broadcast(&mut scalars, root)?;
        for (v, s) in self.saved.1.values_mut().zip(scalars) {
            *v = s;
        }
        self.commits = most[0] as u64;
        self.restore();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_and_restore_follow_arrays_that_change_size_or_go() {
        let mut s = State::new()
            .with_array("w", vec![1.0; 3])
            .with_array("b", vec![2.0]);
        s.array_mut("w").expect("w")[0] = 5.0;
        s.commit();
        assert_eq!(s.commits(), 1);
        s.array_mut("w").expect("w")[0] = 9.0;
        s.restore();
        assert_eq!(s.array("w"), Some(&[5.0, 1.0, 1.0][..]));
        // An array that grows, one that goes: the next commit holds exactly the current ones.
        s.arrays.insert("w".into(), vec![7.0; 4]);
        s.arrays.remove("b");
        s.commit();
        s.arrays.insert("w".into(), vec![0.0; 2]);
        s.arrays.insert("c".into(), vec![3.0]);
        s.restore();
        assert_eq!(s.array("w"), Some(&[7.0; 4][..]));
        assert_eq!(s.array("b"), None);
        assert_eq!(s.array("c"), None);
    }
}
