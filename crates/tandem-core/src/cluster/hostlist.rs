//! Slurm's compressed host lists (`node[01-03,07]`) and task counts (`2(x3),1`).
//!
//! Why written here: Slurm hands every task the job's nodes in this compressed form, and a task
//! needs the expanded list to know where rank 0 (the rendezvous) runs and which ranks share its
//! node. The grammar is small (prefixes, zero-padded ranges, comma lists, repeat counts), so a
//! parser with exact errors is shorter than a dependency on `scontrol` being installed in the
//! container; expansions are bounded so a malformed list cannot exhaust memory.

use crate::error::{Error, Result};

/// The most hosts or tasks an expansion may produce, so a typo cannot exhaust memory.
pub const MAX_EXPANDED: usize = 1 << 20;

/// Most bytes of host names a host list may expand to (a long name times many ranges).
pub const MAX_EXPANDED_BYTES: usize = 64 << 20;

/// Expands a Slurm host list such as `node[01-03,07],gpu-a[1-2]-ib` into host names.
///
/// Zero padding follows the lower bound of each range (`[08-10]` gives `08 09 10`); several bracket
/// groups in one name expand as a product.
///
/// ```
/// use tandem_core::cluster::expand_hostlist;
/// let hosts = expand_hostlist("SLURM_JOB_NODELIST", "node[01-03,07],login").unwrap();
/// assert_eq!(hosts, ["node01", "node02", "node03", "node07", "login"]);
/// ```
pub fn expand_hostlist(variable: &str, list: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for item in split_top_level(variable, list)? {
        let mut names = vec![String::new()];
        let mut rest = item.as_str();
        while !rest.is_empty() {
            match rest.find('[') {
                None => {
                    names.iter_mut().for_each(|n| n.push_str(rest));
                    rest = "";
                }
                Some(open) => {
                    let close = rest[open..].find(']').map(|c| c + open).ok_or_else(|| {
                        Error::config(variable, format!("unclosed '[' in host list item {item:?}"))
                    })?;
                    let prefix = &rest[..open];
                    let suffixes = expand_ranges(variable, &rest[open + 1..close])?;
                    // Checked before anything is made: a few ranges multiply to any size.
                    let count = names
                        .len()
                        .saturating_mul(suffixes.len())
                        .saturating_add(out.len());
                    let longest = names.iter().map(String::len).max().unwrap_or(0)
                        + prefix.len()
                        + suffixes.iter().map(String::len).max().unwrap_or(0);
                    if count > MAX_EXPANDED || count.saturating_mul(longest) > MAX_EXPANDED_BYTES {
                        return Err(Error::config(
                            variable,
                            format!(
                                "host list expands to more than {MAX_EXPANDED} hosts or {} MiB of names",
                                MAX_EXPANDED_BYTES >> 20
                            ),
                        ));
                    }
                    let mut next = Vec::with_capacity(names.len() * suffixes.len());
                    for n in &names {
                        for s in &suffixes {
                            next.push(format!("{n}{prefix}{s}"));
                        }
                    }
                    names = next;
                    rest = &rest[close + 1..];
                }
            }
        }
        if names.iter().any(|n| n.contains(']')) {
            return Err(Error::config(
                variable,
                format!("unmatched ']' in host list item {item:?}"),
            ));
        }
        out.extend(names);
    }
    if out.is_empty() {
        return Err(Error::config(variable, "host list is empty"));
    }
    Ok(out)
}

fn split_top_level(variable: &str, list: &str) -> Result<Vec<String>> {
    let mut items = Vec::new();
    let mut depth = 0i32;
    let mut current = String::new();
    for c in list.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(Error::config(
                variable,
                format!("unbalanced brackets in host list {list:?}"),
            ));
        }
        if c == ',' && depth == 0 {
            items.push(std::mem::take(&mut current));
        } else {
            current.push(c);
        }
    }
    if depth != 0 {
        return Err(Error::config(
            variable,
            format!("unclosed '[' in host list {list:?}"),
        ));
    }
    items.push(current);
    let items: Vec<String> = items.into_iter().map(|s| s.trim().to_string()).collect();
    if items.iter().any(String::is_empty) {
        return Err(Error::config(
            variable,
            format!("empty item in host list {list:?}"),
        ));
    }
    Ok(items)
}

fn expand_ranges(variable: &str, ranges: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for part in ranges.split(',') {
        let part = part.trim();
        let bad = || {
            Error::config(
                variable,
                format!("bad range {part:?} in host list; expected N or N-M"),
            )
        };
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo, hi),
            None => (part, part),
        };
        if lo.is_empty()
            || !lo.bytes().all(|b| b.is_ascii_digit())
            || !hi.bytes().all(|b| b.is_ascii_digit())
            || hi.is_empty()
        {
            return Err(bad());
        }
        let width = lo.len();
        let a: u64 = lo.parse().map_err(|_| bad())?;
        let b: u64 = hi.parse().map_err(|_| bad())?;
        if a > b {
            return Err(Error::config(
                variable,
                format!("range {part:?} in host list runs backwards"),
            ));
        }
        if (b - a) as usize >= MAX_EXPANDED || out.len() + (b - a) as usize >= MAX_EXPANDED {
            return Err(Error::config(
                variable,
                format!("range {part:?} expands to too many hosts"),
            ));
        }
        out.extend((a..=b).map(|i| format!("{i:0width$}")));
    }
    Ok(out)
}

/// Expands Slurm's tasks-per-node form such as `2(x3),1` into one count per node (`[2, 2, 2, 1]`).
///
/// ```
/// use tandem_core::cluster::expand_tasks_per_node;
/// assert_eq!(expand_tasks_per_node("SLURM_TASKS_PER_NODE", "2(x3),1").unwrap(), [2, 2, 2, 1]);
/// ```
pub fn expand_tasks_per_node(variable: &str, value: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in value.split(',') {
        let part = part.trim();
        let bad = || Error::config(variable, format!("bad item {part:?}; expected N or N(xK)"));
        let (count, repeat) = match part.split_once('(') {
            Some((c, r)) => {
                let r = r
                    .strip_prefix('x')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(bad)?;
                (c, r.parse::<usize>().map_err(|_| bad())?)
            }
            None => (part, 1),
        };
        let count: usize = count.parse().map_err(|_| bad())?;
        if count == 0 || repeat == 0 {
            return Err(Error::config(
                variable,
                format!("item {part:?} gives a node no tasks"),
            ));
        }
        if out.len().saturating_add(repeat) > MAX_EXPANDED {
            return Err(Error::config(variable, "expands to too many nodes"));
        }
        out.extend(std::iter::repeat_n(count, repeat));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the fuzzer (fuzz/corpus/cluster_env): ranges that multiply to billions of names
    /// were all made before the bound was checked, and a repeat count near `usize::MAX` wrapped
    /// the bound's sum. Both are refused now, with the bound checked on each side.
    #[test]
    fn expansions_are_bounded_before_they_are_made() {
        let v = "V";
        let fuzzed =
            "gpu*[08-80]\u{1a}4(x[08-80]\u{1a}4(\n7\ngpu*[08-80]\u{1a}4(x[08-80]\u{1a}4(TTx2)";
        assert!(expand_hostlist(v, fuzzed).is_err());
        // Count: 1000 x 1000 names fit, 1025 x 1024 do not.
        assert_eq!(
            expand_hostlist(v, "a[0-999]b[0-999]").unwrap().len(),
            1_000_000
        );
        let e = expand_hostlist(v, "a[0-1024]b[0-1023]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 1048576 hosts"), "{e}");
        // Bytes (64 MiB): a million names of 56 bytes fit, of 76 bytes do not.
        let name = |n: usize| format!("{}[000000-999999]", "x".repeat(n));
        assert_eq!(expand_hostlist(v, &name(50)).unwrap().len(), 1_000_000);
        assert!(expand_hostlist(v, &name(70)).is_err());
        // Repeat counts: up to the bound, and one that would wrap the sum.
        assert_eq!(
            expand_tasks_per_node(v, "1(x1048576)").unwrap().len(),
            MAX_EXPANDED
        );
        assert!(expand_tasks_per_node(v, "1(x1048577)").is_err());
        let wraps = format!("1,1(x{})", usize::MAX);
        assert!(expand_tasks_per_node(v, &wraps).is_err());
    }

    #[test]
    fn expands_ranges_padding_and_products() {
        let v = "V";
        assert_eq!(expand_hostlist(v, "a").unwrap(), ["a"]);
        assert_eq!(
            expand_hostlist(v, "node[08-11]").unwrap(),
            ["node08", "node09", "node10", "node11"]
        );
        assert_eq!(
            expand_hostlist(v, "r[1-2]-n[1,3]").unwrap(),
            ["r1-n1", "r1-n3", "r2-n1", "r2-n3"]
        );
        assert_eq!(
            expand_hostlist(v, "gpu[7],cpu[001-002]-ib").unwrap(),
            ["gpu7", "cpu001-ib", "cpu002-ib"]
        );
    }

    #[test]
    fn rejects_malformed_lists() {
        for bad in [
            "",
            "node[1-",
            "node]1[",
            "node[3-1]",
            "node[a-b]",
            "a,,b",
            "n[[1]]",
            "n[1-2-3]",
            "n[-2]",
            "n[0-99999999]",
        ] {
            let e = expand_hostlist("SLURM_JOB_NODELIST", bad);
            assert!(e.is_err(), "{bad:?} should be rejected");
            assert!(e.unwrap_err().to_string().contains("SLURM_JOB_NODELIST"));
        }
    }

    #[test]
    fn tasks_per_node_forms() {
        let v = "V";
        assert_eq!(expand_tasks_per_node(v, "4").unwrap(), [4]);
        assert_eq!(
            expand_tasks_per_node(v, "1(x2),3,2(x1)").unwrap(),
            [1, 1, 3, 2]
        );
        for bad in ["", "x", "2(3)", "2(x)", "0", "2(x0)", "-1", "2(x3"] {
            assert!(expand_tasks_per_node(v, bad).is_err(), "{bad:?}");
        }
    }
}
