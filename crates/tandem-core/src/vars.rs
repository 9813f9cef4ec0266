//! Reading configuration variables: from the process environment or from a fixture map in tests.

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};

/// A source of configuration variables. Empty values count as unset, as shells make them easily.
///
/// ```
/// use std::collections::HashMap;
/// use tandem_core::vars::Vars;
/// let mut vars = HashMap::new();
/// vars.insert("RANK".to_string(), "3".to_string());
/// assert_eq!(vars.var("RANK").as_deref(), Some("3"));
/// assert_eq!(vars.var("WORLD_SIZE"), None);
/// ```
pub trait Vars {
    /// The raw value of `name`, if set.
    fn raw(&self, name: &str) -> Option<String>;

    /// The value of `name` if it is set and not empty (surrounding whitespace removed).
    fn var(&self, name: &str) -> Option<String> {
        self.raw(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }
}

/// The environment of the current process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Vars for ProcessEnv {
    fn raw(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Vars for HashMap<String, String> {
    fn raw(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

impl Vars for HashMap<&str, String> {
    fn raw(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

impl Vars for BTreeMap<String, String> {
    fn raw(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

impl Vars for [(String, String)] {
    fn raw(&self, name: &str) -> Option<String> {
        self.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }
}

impl Vars for Vec<(String, String)> {
    fn raw(&self, name: &str) -> Option<String> {
        self.as_slice().raw(name)
    }
}

impl Vars for [(&str, &str)] {
    fn raw(&self, name: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

impl<const N: usize> Vars for [(&str, &str); N] {
    fn raw(&self, name: &str) -> Option<String> {
        self.as_slice().raw(name)
    }
}

/// Parses a non-negative integer, naming the variable when it is not one.
pub(crate) fn parse_count(variable: &str, value: &str) -> Result<usize> {
    value.trim().parse::<usize>().map_err(|_| {
        Error::config(
            variable,
            format!("expected a non-negative integer, got {value:?}"),
        )
    })
}

/// Reads an optional non-negative integer variable.
pub(crate) fn count_var(vars: &(impl Vars + ?Sized), name: &str) -> Result<Option<usize>> {
    vars.var(name).map(|v| parse_count(name, &v)).transpose()
}

/// Reads the first of several aliases that is set, with the name it was found under.
pub(crate) fn first_var(vars: &(impl Vars + ?Sized), names: &[&str]) -> Option<(String, String)> {
    names
        .iter()
        .find_map(|n| vars.var(n).map(|v| (n.to_string(), v)))
}

/// Reads the first of several integer aliases that is set.
pub(crate) fn first_count(vars: &(impl Vars + ?Sized), names: &[&str]) -> Result<Option<usize>> {
    match first_var(vars, names) {
        Some((name, v)) => parse_count(&name, &v).map(Some),
        None => Ok(None),
    }
}

/// Checks that `address` is `host:port` with a non-empty host and a port in 1..=65535.
pub fn check_address(variable: &str, address: &str) -> Result<()> {
    let bad = |why: &str| {
        Error::config(
            variable,
            format!("address {address:?} {why}; expected host:port"),
        )
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(|| bad("has no port"))?;
    if host.is_empty() || host.chars().any(char::is_whitespace) {
        return Err(bad("has no valid host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(bad("has no valid port")),
    }
}
