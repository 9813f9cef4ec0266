//! The diagnosis `tandem trace` prints, from the tracks' records alone.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use super::{LATE_US, Track};
use crate::recorder::{Entry, Outcome};

/// The diagnosis `tandem trace` prints.
pub fn diagnose(tracks: &[Track]) -> String {
    let mut s = String::new();
    let ranks: Vec<&Track> = tracks
        .iter()
        .filter(|t| t.identity.role == "rank")
        .collect();
    let others: Vec<&Track> = tracks
        .iter()
        .filter(|t| t.identity.role != "rank")
        .collect();
    let _ = writeln!(
        s,
        "{} process(es): {}",
        tracks.len(),
        tracks
            .iter()
            .map(Track::name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !ranks.is_empty() {
        collectives(&mut s, &ranks);
    }
    for t in others {
        let _ = writeln!(s, "\n{}:", t.name());
        match t.ops.last() {
            Some(e) => {
                let _ = writeln!(s, "  last: #{} {} {}", e.seq, e.call(), outcome(e));
            }
            None => {
                let _ = writeln!(s, "  no operations recorded");
            }
        }
        if let Some(r) = &t.reason {
            let _ = writeln!(s, "  dumped because: {r}");
        }
    }
    s
}

/// An operation's outcome in words, with what it was waiting for.
pub(super) fn outcome(e: &Entry) -> String {
    match &e.outcome {
        Outcome::Ok => "done".into(),
        Outcome::Running => match &e.waiting {
            Some(w) => format!("running, waiting for {w}"),
            None => "running".into(),
        },
        Outcome::Error(m) => match &e.waiting {
            Some(w) => format!("failed while waiting for {w}: {m}"),
            None => format!("failed: {m}"),
        },
    }
}

/// The last collective of every rank, who waited for whom, and the verdict.
fn collectives(s: &mut String, ranks: &[&Track]) {
    let world = ranks.iter().map(|t| t.identity.world).max().unwrap_or(0);
    let present: BTreeSet<usize> = ranks.iter().map(|t| t.identity.index).collect();
    let missing: Vec<usize> = (0..world).filter(|r| !present.contains(r)).collect();
    let _ = writeln!(s, "\nLast collective each rank reached:");
    for t in ranks {
        match t.last_collective() {
            Some(e) => {
                let _ = writeln!(
                    s,
                    "  rank {:<3} op #{} {}: {}",
                    t.identity.index,
                    e.seq,
                    e.call(),
                    outcome(e)
                );
            }
            None => {
                let _ = writeln!(s, "  rank {:<3} no collective recorded", t.identity.index);
            }
        }
    }
    for r in &missing {
        let _ = writeln!(s, "  rank {r:<3} left no dump and no timeline");
    }

    let _ = writeln!(s, "\nWho waited for whom:");
    let mut waits: BTreeMap<usize, usize> = BTreeMap::new();
    for t in ranks {
        if let Some(e) = t.last_collective()
            && e.outcome != Outcome::Ok
            && let Some(p) = e.waiting_on
        {
            waits.insert(t.identity.index, p as usize);
            let _ = writeln!(
                s,
                "  rank {} -> rank {} ({})",
                t.identity.index,
                p,
                e.waiting.as_deref().unwrap_or("")
            );
        }
    }
    if waits.is_empty() {
        let _ = writeln!(s, "  nobody was waiting at the end of the records");
    }

    let _ = writeln!(
        s,
        "\nVerdict from the records: {}",
        verdict(ranks, &missing, &waits)
    );
    // The diagnosis a rank made when its operation timed out had every live rank's answer: the
    // best word there is when there is one.
    if let Some((r, why)) = ranks
        .iter()
        .filter_map(|t| t.reason.as_deref().map(|w| (t.identity.index, w)))
        .find(|(_, w)| w.starts_with("timeout:"))
    {
        let _ = writeln!(s, "What rank {r} concluded when it timed out: {why}");
    }

    stragglers(s, ranks);
    mismatches(s, ranks);

    let reasons: Vec<(usize, &str)> = ranks
        .iter()
        .filter_map(|t| t.reason.as_deref().map(|r| (t.identity.index, r)))
        .collect();
    if !reasons.is_empty() {
        let _ = writeln!(s, "\nWhy each dump was written:");
        for (r, why) in reasons {
            let _ = writeln!(s, "  rank {r}: {why}");
        }
    }
}

/// The rank the stall comes down to, from the records alone.
fn verdict(ranks: &[&Track], missing: &[usize], waits: &BTreeMap<usize, usize>) -> String {
    let lasts: Vec<(usize, Option<&Entry>)> = ranks
        .iter()
        .map(|t| (t.identity.index, t.last_collective()))
        .collect();
    let top = lasts.iter().filter_map(|(_, e)| e.map(|e| e.seq)).max();
    let stuck = lasts
        .iter()
        .any(|(_, e)| e.is_some_and(|e| e.outcome != Outcome::Ok));
    if let Some(top) = top {
        let behind: Vec<String> = lasts
            .iter()
            .filter(|(_, e)| e.is_none_or(|e| e.seq < top))
            .map(|(r, e)| match e {
                Some(e) => format!(
                    "rank {r} (last: op #{} {}, {})",
                    e.seq,
                    e.call(),
                    outcome(e)
                ),
                None => format!("rank {r} (no collective)"),
            })
            .collect();
        if !behind.is_empty() && stuck {
            return format!(
                "{} never started op #{top}, which the other ranks were in",
                behind.join(", ")
            );
        }
    }
    if !missing.is_empty() && stuck {
        return format!(
            "rank(s) {} left no records (killed, or their host cut off?) while the others were stuck",
            join(missing)
        );
    }
    // Follow the wait chains from any rank.
    if let Some(&start) = waits.keys().next() {
        let mut seen = vec![start];
        let mut at = start;
        while let Some(&next) = waits.get(&at) {
            if let Some(i) = seen.iter().position(|r| *r == next) {
                let cycle = &seen[i..];
                return format!(
                    "ranks {} wait on each other in a cycle (each blocked on the next)",
                    join(cycle)
                );
            }
            seen.push(next);
            at = next;
        }
        return format!(
            "rank {at}: the chain of waits ends there ({})",
            seen.iter()
                .map(|r| format!("rank {r}"))
                .collect::<Vec<_>>()
                .join(" -> ")
        );
    }
    if stuck {
        "the ranks failed without a wait to follow; see why each dump was written".into()
    } else {
        "every recorded collective completed".into()
    }
}

/// Ranks as a comma-separated list.
fn join(ranks: &[usize]) -> String {
    ranks
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The late-arrival table: how often each peer started late, and by how much.
fn stragglers(s: &mut String, ranks: &[&Track]) {
    // peer -> (observed, late lateness list)
    let mut per: BTreeMap<u32, (usize, Vec<u64>)> = BTreeMap::new();
    for t in ranks {
        for e in t.ops.iter().filter(|e| e.is_collective()) {
            if let (Some(p), Some(us)) = (e.late_peer, e.late_us) {
                let c = per.entry(p).or_default();
                c.0 += 1;
                if us >= LATE_US {
                    c.1.push(us);
                }
            }
        }
    }
    let _ = writeln!(
        s,
        "\nLate arrivals (a rank starting a collective {} ms or more after the neighbour waiting on it):",
        LATE_US / 1000
    );
    if per.values().all(|(_, l)| l.is_empty()) {
        let _ = writeln!(s, "  none");
        return;
    }
    let _ = writeln!(s, "  rank   late/seen   median     max");
    let mut rows: Vec<(u32, usize, Vec<u64>)> =
        per.into_iter().map(|(p, (n, l))| (p, n, l)).collect();
    rows.sort_by_key(|(p, _, l)| (std::cmp::Reverse(l.len()), *p));
    for (p, n, mut l) in rows {
        if l.is_empty() {
            continue;
        }
        l.sort_unstable();
        let _ = writeln!(
            s,
            "  {:<6} {:>4}/{:<6} {:>7.1} ms {:>7.1} ms",
            p,
            l.len(),
            n,
            l[l.len() / 2] as f64 / 1000.0,
            l[l.len() - 1] as f64 / 1000.0
        );
    }
}

/// Calls of one sequence number that differ between ranks (kind, dtype, count, root).
fn mismatches(s: &mut String, ranks: &[&Track]) {
    // seq -> rank -> call
    let mut calls: BTreeMap<u64, BTreeMap<usize, String>> = BTreeMap::new();
    for t in ranks {
        for e in t.ops.iter().filter(|e| e.is_collective()) {
            calls
                .entry(e.seq)
                .or_default()
                .insert(t.identity.index, e.call());
        }
    }
    let bad: Vec<(u64, BTreeMap<usize, String>)> = calls
        .into_iter()
        .filter(|(_, by)| by.values().collect::<BTreeSet<_>>().len() > 1)
        .collect();
    if bad.is_empty() {
        return;
    }
    let _ = writeln!(s, "\nMismatched calls:");
    for (seq, by) in bad.iter().take(10) {
        let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (r, c) in by {
            groups.entry(c.as_str()).or_default().push(*r);
        }
        let parts: Vec<String> = groups
            .iter()
            .map(|(c, rs)| format!("rank(s) {} called {c}", join(rs)))
            .collect();
        let _ = writeln!(s, "  op #{seq}: {}", parts.join("; "));
    }
    if bad.len() > 10 {
        let _ = writeln!(s, "  ... and {} more", bad.len() - 10);
    }
}
