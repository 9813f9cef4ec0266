//! The in-memory store behind the rendezvous: keys, counters and barriers, with waits bounded in time.
//!
//! Pure logic with no gRPC, so it is unit-tested directly. Every change bumps a `watch` version that
//! waiters subscribe to before they check, so no wake-up is lost.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;

/// Limits that keep one job's store bounded.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest key in bytes.
    pub max_key_len: usize,
    /// Largest value in bytes.
    pub max_value_len: usize,
    /// Most bytes of keys and values held at once.
    pub max_total_bytes: usize,
    /// Longest wait a request may ask for.
    pub max_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_len: 1024,
            max_value_len: 8 << 20,
            max_total_bytes: 256 << 20,
            max_wait: Duration::from_secs(24 * 3600),
        }
    }
}

/// Most members a barrier may have.
pub const MAX_PARTICIPANTS: u32 = 1 << 20;

/// Most missing members a timed-out barrier lists (the lowest ones).
pub const MAX_MISSING_LISTED: usize = 1024;

/// Why a store operation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The request is malformed (empty or long key, oversized value, bad barrier arguments).
    Invalid(String),
    /// The store is full.
    Full(String),
    /// A counter key holds a value that is not an integer.
    NotACounter(String),
}

/// Outcome of a wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitOutcome {
    /// Every key arrived; values in the order asked.
    Ready(Vec<Bytes>),
    /// The deadline passed; these keys were still missing.
    TimedOut(Vec<String>),
}

/// Outcome of a compare-and-set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CasOutcome {
    /// Whether the desired value was stored.
    pub swapped: bool,
    /// The value now stored (absent if none).
    pub current: Option<Bytes>,
}

/// A named barrier: how many take part, its round, and who has arrived in it.
#[derive(Default)]
struct Barrier {
    /// How many take part.
    participants: u32,
    /// The current round.
    round: u64,
    /// Who arrived in it.
    arrived: BTreeSet<u32>,
}

/// What the store holds: the keys' values, the barriers, and the bytes stored (bounded).
#[derive(Default)]
struct State {
    /// Values by key.
    kv: HashMap<String, Bytes>,
    /// Barriers by name.
    barriers: HashMap<String, Barrier>,
    /// Bytes of keys and values stored.
    total_bytes: usize,
}

/// The rendezvous store.
pub struct Store {
    /// The bounds.
    limits: Limits,
    /// What it holds.
    state: Mutex<State>,
    /// Bumped on every change, to wake waiters.
    version: watch::Sender<u64>,
}

impl Store {
    /// An empty store with the given limits.
    pub fn new(limits: Limits) -> Self {
        Store {
            limits,
            state: Mutex::new(State::default()),
            version: watch::Sender::new(0),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The state, locked (a poisoned lock is taken over: the state stays consistent per call).
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map half-updated (each change is one call),
        // so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes every waiter: something changed.
    fn bump(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Refuses an empty or overlong key.
    fn check_key(&self, key: &str) -> Result<(), StoreError> {
        if key.is_empty() {
            return Err(StoreError::Invalid("key is empty".into()));
        }
        if key.len() > self.limits.max_key_len {
            return Err(StoreError::Invalid(format!(
                "key of {} bytes exceeds the limit of {}",
                key.len(),
                self.limits.max_key_len
            )));
        }
        Ok(())
    }

    /// Stores `value` under `key` within the store's byte and key limits.
    fn put(&self, st: &mut State, key: &str, value: Bytes) -> Result<(), StoreError> {
        if value.len() > self.limits.max_value_len {
            return Err(StoreError::Invalid(format!(
                "value of {} bytes for key {key:?} exceeds the limit of {}",
                value.len(),
                self.limits.max_value_len
            )));
        }
        let old = st.kv.get(key).map_or(0, |v| v.len() + key.len());
        let new_total = st.total_bytes - old + value.len() + key.len();
        if new_total > self.limits.max_total_bytes {
            return Err(StoreError::Full(format!(
                "storing {key:?} would hold {new_total} bytes, over the limit of {}",
                self.limits.max_total_bytes
            )));
        }
        st.total_bytes = new_total;
        st.kv.insert(key.to_string(), value);
        Ok(())
    }

    /// Stores `value` under `key`.
    pub fn set(&self, key: &str, value: Bytes) -> Result<(), StoreError> {
        self.check_key(key)?;
        let r = self.put(&mut self.lock(), key, value);
        if r.is_ok() {
            self.bump();
        }
        r
    }

    /// Reads `key`.
    pub fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        self.check_key(key)?;
        Ok(self.lock().kv.get(key).cloned())
    }

    /// Removes `key`; whether it existed.
    pub fn delete(&self, key: &str) -> Result<bool, StoreError> {
        self.check_key(key)?;
        let mut st = self.lock();
        let removed = st.kv.remove(key);
        if let Some(v) = &removed {
            st.total_bytes -= v.len() + key.len();
        }
        drop(st);
        if removed.is_some() {
            self.bump();
        }
        Ok(removed.is_some())
    }

    /// Adds `delta` to the counter at `key` (decimal text, created at 0) and returns the new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.check_key(key)?;
        let mut st = self.lock();
        let current = match st.kv.get(key) {
            None => 0,
            Some(v) => std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or_else(|| {
                    StoreError::NotACounter(format!(
                        "key {key:?} holds a value that is not an integer"
                    ))
                })?,
        };
        let next = current.checked_add(delta).ok_or_else(|| {
            StoreError::Invalid(format!(
                "counter {key:?} would overflow: {current} + {delta}"
            ))
        })?;
        self.put(&mut st, key, Bytes::from(next.to_string()))?;
        drop(st);
        self.bump();
        Ok(next)
    }

    /// Stores `desired` only if the current value equals `expected` (`None`: the key is absent).
    pub fn compare_and_set(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        desired: Bytes,
    ) -> Result<CasOutcome, StoreError> {
        self.check_key(key)?;
        let mut st = self.lock();
        let current = st.kv.get(key).cloned();
        if current.as_deref() != expected {
            return Ok(CasOutcome {
                swapped: false,
                current,
            });
        }
        self.put(&mut st, key, desired.clone())?;
        drop(st);
        self.bump();
        Ok(CasOutcome {
            swapped: true,
            current: Some(desired),
        })
    }

    /// The deadline of a wait of `timeout`, at most the store's longest wait.
    fn clamp(&self, timeout: Duration) -> Instant {
        Instant::now() + timeout.min(self.limits.max_wait)
    }

    /// Waits until every key is present or `timeout` passes.
    pub async fn wait(
        &self,
        keys: &[String],
        timeout: Duration,
    ) -> Result<WaitOutcome, StoreError> {
        for k in keys {
            self.check_key(k)?;
        }
        let deadline = self.clamp(timeout);
        let mut changes = self.version.subscribe();
        loop {
            changes.borrow_and_update();
            let missing: Vec<String> = {
                let st = self.lock();
                keys.iter()
                    .filter(|k| !st.kv.contains_key(*k))
                    .cloned()
                    .collect()
            };
            if missing.is_empty() {
                let st = self.lock();
                // Keys are never removed between the check and here except by delete; re-check.
                if let Some(values) = keys
                    .iter()
                    .map(|k| st.kv.get(k).cloned())
                    .collect::<Option<Vec<_>>>()
                {
                    return Ok(WaitOutcome::Ready(values));
                }
                continue;
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Ok(WaitOutcome::TimedOut(missing));
            }
        }
    }

    /// Counts `member` in the named barrier's current round (the last to arrive opens the next);
    /// returns the round it entered.
    fn arrive(&self, name: &str, participants: u32, member: u32) -> Result<u64, StoreError> {
        let mut st = self.lock();
        let b = st.barriers.entry(name.to_string()).or_default();
        if b.arrived.is_empty() {
            b.participants = participants;
        } else if b.participants != participants {
            return Err(StoreError::Invalid(format!(
                "barrier {name:?}: this member says {participants} participants, earlier members said {}",
                b.participants
            )));
        }
        if !b.arrived.insert(member) {
            return Err(StoreError::Invalid(format!(
                "barrier {name:?}: member {member} entered twice"
            )));
        }
        let round = b.round;
        if b.arrived.len() == participants as usize {
            b.arrived.clear();
            b.round += 1;
        }
        Ok(round)
    }

    /// Enters round after round of the named barrier; returns the members missing at the timeout,
    /// or an empty list when all `participants` arrived.
    pub async fn barrier(
        &self,
        name: &str,
        participants: u32,
        member: u32,
        timeout: Duration,
    ) -> Result<Vec<u32>, StoreError> {
        self.check_key(name)?;
        if participants > MAX_PARTICIPANTS {
            return Err(StoreError::Invalid(format!(
                "barrier {name:?}: {participants} participants (at most {MAX_PARTICIPANTS})"
            )));
        }
        if participants == 0 || member >= participants {
            return Err(StoreError::Invalid(format!(
                "barrier {name:?}: member {member} is not below the {participants} participants"
            )));
        }
        let deadline = self.clamp(timeout);
        let mut changes = self.version.subscribe();
        let round = self.arrive(name, participants, member)?;
        self.bump();
        loop {
            changes.borrow_and_update();
            {
                let mut st = self.lock();
                let b = st.barriers.entry(name.to_string()).or_default();
                if b.round > round {
                    return Ok(Vec::new());
                }
                if Instant::now() >= deadline {
                    b.arrived.remove(&member);
                    let missing = (0..participants)
                        .filter(|m| !b.arrived.contains(m) && *m != member)
                        .take(MAX_MISSING_LISTED)
                        .collect();
                    return Ok(missing);
                }
            }
            let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn store() -> Arc<Store> {
        Arc::new(Store::new(Limits::default()))
    }

    #[tokio::test]
    async fn set_get_delete_add_cas() {
        let s = store();
        s.set("a", Bytes::from_static(b"1")).unwrap();
        assert_eq!(s.get("a").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(s.add("a", 41).unwrap(), 42);
        assert_eq!(s.add("n", -3).unwrap(), -3);
        s.set("t", Bytes::from_static(b"text")).unwrap();
        assert!(matches!(s.add("t", 1), Err(StoreError::NotACounter(_))));
        let r = s
            .compare_and_set("c", None, Bytes::from_static(b"x"))
            .unwrap();
        assert!(r.swapped);
        let r = s
            .compare_and_set("c", None, Bytes::from_static(b"y"))
            .unwrap();
        assert_eq!((r.swapped, r.current.as_deref()), (false, Some(&b"x"[..])));
        let r = s
            .compare_and_set("c", Some(b"x"), Bytes::from_static(b"y"))
            .unwrap();
        assert!(r.swapped);
        assert!(s.delete("c").unwrap());
        assert!(!s.delete("c").unwrap());
        assert!(s.get("").is_err());
    }

    #[tokio::test]
    async fn limits_are_enforced() {
        let s = Store::new(Limits {
            max_value_len: 4,
            max_total_bytes: 9,
            ..Limits::default()
        });
        assert!(matches!(
            s.set("k", Bytes::from_static(b"12345")),
            Err(StoreError::Invalid(_))
        ));
        s.set("k", Bytes::from_static(b"1234")).unwrap();
        assert!(matches!(
            s.set("j", Bytes::from_static(b"1234")),
            Err(StoreError::Full(_))
        ));
        // Replacing a value frees its old size first.
        s.set("k", Bytes::from_static(b"12")).unwrap();
        s.set("j", Bytes::from_static(b"12")).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn wait_wakes_on_set_and_times_out_naming_missing() {
        let s = store();
        let s2 = s.clone();
        let waiter = tokio::spawn(async move {
            s2.wait(&["x".into(), "y".into()], Duration::from_secs(60))
                .await
        });
        s.set("x", Bytes::from_static(b"1")).unwrap();
        s.set("y", Bytes::from_static(b"2")).unwrap();
        let got = waiter.await.unwrap().unwrap();
        assert_eq!(
            got,
            WaitOutcome::Ready(vec![Bytes::from_static(b"1"), Bytes::from_static(b"2")])
        );
        let r = s
            .wait(&["x".into(), "z".into()], Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(r, WaitOutcome::TimedOut(vec!["z".into()]));
    }

    /// Found by the fuzzer (fuzz/artifacts of rendezvous_handlers): a barrier of 4 billion
    /// participants that timed out listed every missing one, gigabytes of them. Participants are
    /// bounded now (checked on each side of the bound), and so is the list.
    #[tokio::test]
    async fn huge_barriers_are_refused_and_missing_lists_bounded() {
        let s = store();
        let e = s
            .barrier("huge", MAX_PARTICIPANTS + 1, 0, Duration::from_millis(1))
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Invalid(m) if m.contains("at most")));
        let missing = s
            .barrier("big", MAX_PARTICIPANTS, 5, Duration::from_millis(1))
            .await
            .unwrap();
        assert_eq!(missing.len(), MAX_MISSING_LISTED);
        assert_eq!(missing[..6], [0, 1, 2, 3, 4, 6]);
    }

    #[tokio::test(start_paused = true)]
    async fn barrier_rounds_and_timeouts() {
        let s = store();
        for _round in 0..3 {
            let mut tasks = Vec::new();
            for m in 0..4 {
                let s = s.clone();
                tasks.push(tokio::spawn(async move {
                    s.barrier("b", 4, m, Duration::from_secs(30)).await
                }));
            }
            for t in tasks {
                assert_eq!(t.await.unwrap().unwrap(), Vec::<u32>::new());
            }
        }
        let missing = s
            .barrier("lonely", 3, 1, Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(missing, vec![0, 2]);
        // The timed-out member left, so it may enter again.
        let missing = s
            .barrier("lonely", 3, 1, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(missing, vec![0, 2]);
        assert!(s.barrier("x", 2, 2, Duration::from_secs(1)).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn barrier_disagreeing_sizes_and_twice() {
        let s = store();
        let s2 = s.clone();
        let first =
            tokio::spawn(async move { s2.barrier("b", 2, 0, Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        let e = s
            .barrier("b", 3, 1, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Invalid(m) if m.contains("3 participants")));
        let e = s
            .barrier("b", 2, 0, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Invalid(m) if m.contains("twice")));
        assert_eq!(first.await.unwrap().unwrap(), vec![1]);
    }
}
