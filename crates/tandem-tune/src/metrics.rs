//! Metrics from trial output, in Katib's default format: `name=value` anywhere in a line (several
//! per line, separated by spaces or commas). A `step=N` (or `epoch=N`) on the same line gives the
//! other values' step; otherwise each report of a metric is its next step.

use std::collections::BTreeMap;

/// One reported value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    /// The step it belongs to.
    pub step: u64,
    /// The value.
    pub value: f64,
}

/// Every value a trial reported, per metric, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    /// Reports by metric name.
    pub series: BTreeMap<String, Vec<Report>>,
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
}

/// The `name=value` pairs of one line, in order.
///
/// ```
/// let p = tandem_tune::metrics::parse_line("epoch 3: step=3 accuracy=0.91, loss=2.5e-1 lr=x");
/// assert_eq!(p, vec![("step".to_string(), 3.0), ("accuracy".into(), 0.91), ("loss".into(), 0.25)]);
/// ```
pub fn parse_line(line: &str) -> Vec<(String, f64)> {
    line.split(|c: char| c.is_whitespace() || c == ',' || c == ';')
        .filter_map(|tok| {
            let (k, v) = tok.split_once('=')?;
            let v: f64 = v.trim().parse().ok()?;
            (is_name(k.trim()) && v.is_finite()).then(|| (k.trim().to_string(), v))
        })
        .collect()
}

impl Metrics {
    /// Records one line of output; returns the reports it added as (name, report).
    pub fn add_line(&mut self, line: &str) -> Vec<(String, Report)> {
        let pairs = parse_line(line);
        let step = pairs
            .iter()
            .find(|(k, _)| k == "step" || k == "epoch")
            .map(|(_, v)| *v as u64);
        let mut added = Vec::new();
        for (name, value) in pairs {
            if name == "step" || name == "epoch" {
                continue;
            }
            let series = self.series.entry(name.clone()).or_default();
            let step = step.unwrap_or(series.len() as u64 + 1);
            let r = Report { step, value };
            series.push(r);
            added.push((name, r));
        }
        added
    }

    /// A metric's value by `strategy`: the largest, smallest or last report.
    pub fn value(&self, name: &str, strategy: crate::spec::Strategy) -> Option<f64> {
        let s = self.series.get(name)?;
        let values = s.iter().map(|r| r.value);
        match strategy {
            crate::spec::Strategy::Max => {
                values.fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))))
            }
            crate::spec::Strategy::Min => {
                values.fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.min(v))))
            }
            crate::spec::Strategy::Latest => s.last().map(|r| r.value),
        }
    }

    /// The last value of `name` reported at or before `step`.
    pub fn at_step(&self, name: &str, step: u64) -> Option<f64> {
        self.series
            .get(name)?
            .iter()
            .filter(|r| r.step <= step)
            .max_by_key(|r| r.step)
            .map(|r| r.value)
    }
}
