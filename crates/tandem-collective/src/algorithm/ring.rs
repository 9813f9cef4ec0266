//! The ring schedule: at each step of each phase, which chunk a rank sends right and which it receives
//! from the left. Chunks are the [`partition`](super::chunking::partition) of the buffer into
//! `world` parts.
//!
//! ```text
//! reduce-scatter, 3 ranks, step s: rank r sends chunk (r-s-1) and reduces chunk (r-s-2) into its own
//!        step 0          step 1          after: rank r holds chunk r fully reduced
//!   r0: send c2, +c1  send c1, +c0      r0: c0
//!   r1: send c0, +c2  send c2, +c1      r1: c1
//!   r2: send c1, +c0  send c0, +c2      r2: c2
//! allgather, step s: rank r sends chunk (r-s) and receives chunk (r-s-1) in place
//! ```

/// The rank to the right (the one this rank sends to).
pub fn right(rank: usize, world: usize) -> usize {
    (rank + 1) % world
}

/// The rank to the left (the one this rank receives from).
pub fn left(rank: usize, world: usize) -> usize {
    (rank + world - 1) % world
}

/// The rank `back` places before `rank` around the ring.
fn wrap(rank: usize, back: usize, world: usize) -> usize {
    (rank + world * 2 - back % world) % world
}

/// Reduce-scatter step `step` (0-based, `world - 1` steps): `(send_chunk, recv_chunk)`. After the last
/// step rank `r` holds chunk `r` fully reduced.
pub fn reduce_scatter_step(rank: usize, world: usize, step: usize) -> (usize, usize) {
    (wrap(rank, step + 1, world), wrap(rank, step + 2, world))
}

/// Allgather step `step` (0-based, `world - 1` steps), starting from each rank holding chunk `rank`:
/// `(send_chunk, recv_chunk)`.
pub fn allgather_step(rank: usize, world: usize, step: usize) -> (usize, usize) {
    (wrap(rank, step, world), wrap(rank, step + 1, world))
}

/// Position of `rank` in the broadcast chain that starts at `root` and runs rightwards.
pub fn chain_position(rank: usize, root: usize, world: usize) -> usize {
    (rank + world - root) % world
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates the schedule symbolically: each chunk holds the set of ranks summed into it.
    #[test]
    fn reduce_scatter_then_allgather_gives_everyone_everything() {
        for world in 1..=8 {
            let full: u64 = (1u64 << world) - 1;
            // held[r][c] = bitmask of contributions rank r has for chunk c
            let mut held: Vec<Vec<u64>> = (0..world).map(|r| vec![1u64 << r; world]).collect();
            for step in 0..world.saturating_sub(1) {
                let sent: Vec<(usize, u64)> = (0..world)
                    .map(|r| {
                        let (s, _) = reduce_scatter_step(r, world, step);
                        (s, held[r][s])
                    })
                    .collect();
                for r in 0..world {
                    let (_, recv) = reduce_scatter_step(r, world, step);
                    let (chunk, bits) = sent[left(r, world)];
                    assert_eq!(chunk, recv, "world {world} step {step} rank {r}");
                    assert_eq!(held[r][recv] & bits, 0, "a contribution counted twice");
                    held[r][recv] |= bits;
                }
            }
            for (r, h) in held.iter().enumerate() {
                assert_eq!(h[r], full, "world {world}: rank {r} owns chunk {r} reduced");
            }
            for step in 0..world.saturating_sub(1) {
                let sent: Vec<(usize, u64)> = (0..world)
                    .map(|r| {
                        let (s, _) = allgather_step(r, world, step);
                        (s, held[r][s])
                    })
                    .collect();
                for r in 0..world {
                    let (_, recv) = allgather_step(r, world, step);
                    let (chunk, bits) = sent[left(r, world)];
                    assert_eq!(chunk, recv);
                    assert_eq!(bits, full, "only complete chunks travel in the allgather");
                    held[r][recv] = bits;
                }
            }
            assert!(
                held.iter().all(|h| h.iter().all(|&b| b == full)),
                "world {world}"
            );
        }
    }

    #[test]
    fn neighbours_and_chain() {
        assert_eq!((left(0, 4), right(3, 4)), (3, 0));
        assert_eq!((left(0, 1), right(0, 1)), (0, 0));
        assert_eq!(chain_position(1, 2, 4), 3);
        assert_eq!(chain_position(2, 2, 4), 0);
    }
}
