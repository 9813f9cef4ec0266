//! What the elastic tests check in the test node's `elastic` mode: which steps were applied by
//! which members (`APPLIED <step> MEMBERS <ids>` lines) and the parameters a control computes
//! from them, independently of the processes.

use std::collections::BTreeMap;

/// Member `id`'s gradient for element `i` at `step` (0-based), as the test node computes it.
pub fn g(id: u64, step: u64, i: usize) -> f64 {
    ((i * 7 + id as usize * 13 + step as usize * 3) % 11) as f64 - 5.0
}

/// Steps applied, from every process's `APPLIED` lines: each step's members, checked to agree
/// (a step applied by two memberships fails the test).
pub fn applied(outs: &[String]) -> BTreeMap<u64, Vec<u64>> {
    let mut steps: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for text in outs {
        for l in text.lines() {
            let Some(rest) = l.strip_prefix("APPLIED ") else {
                continue;
            };
            let (step, members) = rest.split_once(" MEMBERS ").expect("APPLIED line");
            let step: u64 = step.parse().expect("step");
            let members: Vec<u64> = members.split(',').map(|m| m.parse().expect("id")).collect();
            if let Some(seen) = steps.get(&step) {
                assert_eq!(seen, &members, "step {step} applied by two memberships");
            }
            steps.insert(step, members);
        }
    }
    steps
}

/// The control: the parameters (`len` elements) after `steps`, each step adding g of every one
/// of its members.
pub fn control(steps: &BTreeMap<u64, Vec<u64>>, len: usize) -> Vec<f64> {
    let mut w = vec![0.0; len];
    for (step, members) in steps {
        for (i, w) in w.iter_mut().enumerate() {
            *w += members.iter().map(|m| g(*m, step - 1, i)).sum::<f64>();
        }
    }
    w
}

/// The parameters `w` of a `RESULT` JSON object.
pub fn weights(result: &serde_json::Value) -> Vec<f64> {
    result["w"]
        .as_array()
        .expect("w")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// The parameters of the first `RESULT` line of `text`; panics naming `who` when there is none.
pub fn result_weights(text: &str, who: &str) -> Vec<f64> {
    let r = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("{who}: no RESULT\n{text}"));
    weights(&serde_json::from_str(r).expect("json"))
}
