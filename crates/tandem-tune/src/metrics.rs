//! Metrics from trial output, in Katib's default format: `name=value` anywhere in a line (several
//! per line, separated by spaces or commas). A `step=N` (or `epoch=N`) on the same line gives the
//! other values' step; otherwise each report of a metric is its next step.
//!
//! Why Katib's format: experiments written for Katib print their metrics that way already; reading
//! the same lines lets their trial programs run unchanged.

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

/// Whether `s` can name a metric: letters, digits, `_`, `-`, `.` and `/`, starting with a
/// letter or `_`.
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

/// Where a trial's metrics come from, as Katib's `metricsCollectorSpec` says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Source {
    /// Its standard output, line by line (Katib's `StdOut`, the default).
    #[default]
    StdOut,
    /// A file it writes, read when it ends (Katib's `File`): lines of text, or JSON objects one
    /// per line whose keys are metric names.
    File {
        /// The file (relative to the trial's working directory).
        path: String,
        /// JSON lines instead of text.
        json: bool,
    },
}

/// How metrics are collected: the source and, optionally, Katib's `filter.metricsFormat`
/// regular expressions (each with two groups: the name, then the value). Without them, lines are
/// read with [`parse_line`] (Katib's default format).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Collector {
    /// Where the metrics come from.
    pub source: Source,
    /// Katib's `metricsFormat` expressions.
    pub formats: Vec<String>,
}

/// Reads `name=value` pairs off lines, by a collector's expressions or the default format.
#[derive(Debug, Clone, Default)]
pub struct LineParser {
    /// The collector's filters (Katib's `metricsFormat`), compiled.
    formats: Vec<regex::Regex>,
}

impl LineParser {
    /// Compiles `collector`'s expressions; an expression that does not compile, or has fewer than
    /// two groups, is an error naming it.
    pub fn new(collector: &Collector) -> tandem_core::Result<LineParser> {
        let mut formats = Vec::new();
        for (i, f) in collector.formats.iter().enumerate() {
            let field = format!("spec.metricsCollectorSpec.source.filter.metricsFormat[{i}]");
            let re = regex::Regex::new(f)
                .map_err(|e| tandem_core::Error::config(&field, format!("{f:?}: {e}")))?;
            if re.captures_len() < 3 {
                return Err(tandem_core::Error::config(
                    field,
                    format!("{f:?} needs two groups: the metric's name, then its value"),
                ));
            }
            formats.push(re);
        }
        Ok(LineParser { formats })
    }

    /// The `name=value` pairs of one line, in order.
    pub fn parse(&self, line: &str) -> Vec<(String, f64)> {
        if self.formats.is_empty() {
            return parse_line(line);
        }
        let mut out = Vec::new();
        for re in &self.formats {
            for c in re.captures_iter(line) {
                let (Some(k), Some(v)) = (c.get(1), c.get(2)) else {
                    continue;
                };
                if let Ok(v) = v.as_str().trim().parse::<f64>()
                    && v.is_finite()
                {
                    out.push((k.as_str().trim().to_string(), v));
                }
            }
        }
        out
    }

    /// The numeric fields of one JSON object line (values may be numbers or numeric strings).
    pub fn parse_json(&self, line: &str) -> Vec<(String, f64)> {
        let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(line)
        else {
            return Vec::new();
        };
        map.into_iter()
            .filter(|(k, _)| k != "timestamp")
            .filter_map(|(k, v)| {
                let n = match v {
                    serde_json::Value::Number(n) => n.as_f64(),
                    serde_json::Value::String(s) => s.trim().parse().ok(),
                    _ => None,
                }?;
                n.is_finite().then_some((k, n))
            })
            .collect()
    }
}

impl Metrics {
    /// Records one line of output; returns the reports it added as (name, report).
    pub fn add_line(&mut self, line: &str) -> Vec<(String, Report)> {
        self.add_pairs(parse_line(line))
    }

    /// Records the pairs of one line (a `step` or `epoch` among them gives the others' step).
    pub fn add_pairs(&mut self, pairs: Vec<(String, f64)>) -> Vec<(String, Report)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn collector(formats: &[&str]) -> Collector {
        Collector {
            source: Source::StdOut,
            formats: formats.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn metrics_format_expressions_pick_what_they_match_and_nothing_else() {
        // Katib's example filter: only lines of the form `{metricName: ..., metricValue: ...}`.
        let p = LineParser::new(&collector(&[
            r"\{metricName: ([\w|-]+), metricValue: ((-?\d+)(\.\d+)?)\}",
        ]))
        .expect("compiles");
        assert_eq!(
            p.parse("epoch 1 {metricName: accuracy, metricValue: 0.8} loss=3"),
            vec![("accuracy".to_string(), 0.8)]
        );
        assert!(
            p.parse("accuracy=0.9").is_empty(),
            "the default format is not used"
        );
        // Without expressions: Katib's default `name=value`.
        let d = LineParser::new(&Collector::default()).expect("default");
        assert_eq!(d.parse("accuracy=0.9"), vec![("accuracy".to_string(), 0.9)]);
    }

    #[test]
    fn a_metrics_format_needs_two_groups_and_must_compile() {
        let e = LineParser::new(&collector(&["accuracy=([0-9.]+)"])).expect_err("one group");
        assert!(
            e.to_string().contains("metricsFormat[0]") && e.to_string().contains("two groups"),
            "{e}"
        );
        let e = LineParser::new(&collector(&["(a)(b)", "(unclosed"])).expect_err("bad regex");
        assert!(e.to_string().contains("metricsFormat[1]"), "{e}");
        assert!(LineParser::new(&collector(&["(a)(b)"])).is_ok());
    }

    #[test]
    fn json_lines_give_their_numeric_fields() {
        let p = LineParser::default();
        let mut got =
            p.parse_json(r#"{"loss": "0.25", "accuracy": 0.9, "timestamp": 1.5, "note": "x"}"#);
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got,
            vec![("accuracy".to_string(), 0.9), ("loss".to_string(), 0.25)]
        );
        assert!(p.parse_json("not json").is_empty());
        assert!(p.parse_json("[1, 2]").is_empty());
    }
}
