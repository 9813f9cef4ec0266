//! How a job's processes run Tandem's own command line and a Python script.
//!
//! The `tandem` command exists twice: as the Rust binary and as the Python package's entry point
//! (`tandem` / `python -m tandem`, the same CLI running inside the extension). A job started by
//! either must run the same one when a command says `tandem ...`, so the entry point sets
//! `TANDEM_CLI` (and `TANDEM_PYTHON`, the interpreter that runs `.py` scripts) for itself and
//! the processes it starts.

/// The command that runs the `tandem` CLI, as words: `TANDEM_CLI` split on whitespace when set
/// (the Python entry point sets `<python> -m tandem`), else this executable when it is the
/// `tandem` binary, else `tandem` from PATH.
///
/// ```
/// let cli = tandem_launch::cli_command();
/// assert!(!cli.is_empty());
/// ```
pub fn cli_command() -> Vec<String> {
    cli_command_from(
        std::env::var(tandem_core::settings::CLI.name)
            .ok()
            .as_deref(),
        std::env::current_exe().ok().as_deref(),
    )
}

/// [`cli_command`] from the variable's value and this program's path.
fn cli_command_from(var: Option<&str>, exe: Option<&std::path::Path>) -> Vec<String> {
    let words: Vec<String> = var
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if !words.is_empty() {
        return words;
    }
    let exe = exe
        .filter(|p| p.file_stem().is_some_and(|s| s == "tandem"))
        .map_or_else(|| "tandem".into(), |p| p.to_string_lossy().into_owned());
    vec![exe]
}

/// The interpreter that runs a job command given as a bare `.py` script: `TANDEM_PYTHON` when
/// set (the Python entry point sets its own interpreter), else `python3`.
pub fn python() -> String {
    tandem_core::settings::PYTHON
        .text(&tandem_core::cluster::ProcessEnv)
        .ok()
        .flatten()
        .unwrap_or_else(|| "python3".into())
}

/// A job's command as it is run: a leading `tandem` becomes [`cli_command`], a leading `*.py`
/// script gets [`python`] in front; anything else is unchanged.
///
/// ```
/// let cmd = tandem_launch::resolve_command(vec!["train.py".into(), "--lr".into(), "0.1".into()]);
/// assert_eq!(cmd[1..], ["train.py", "--lr", "0.1"]);
/// let cmd = tandem_launch::resolve_command(vec!["./run".into()]);
/// assert_eq!(cmd, ["./run"]);
/// ```
pub fn resolve_command(command: Vec<String>) -> Vec<String> {
    match command.first().map(String::as_str) {
        Some("tandem") => cli_command()
            .into_iter()
            .chain(command.into_iter().skip(1))
            .collect(),
        Some(s) if s.ends_with(".py") => std::iter::once(python()).chain(command).collect(),
        _ => command,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn the_cli_is_the_variable_then_this_binary_then_path() {
        assert_eq!(
            cli_command_from(
                Some("/v/bin/python3 -m tandem"),
                Some(Path::new("/x/tandem"))
            ),
            ["/v/bin/python3", "-m", "tandem"]
        );
        assert_eq!(
            cli_command_from(Some("  "), Some(Path::new("/x/tandem"))),
            ["/x/tandem"]
        );
        assert_eq!(
            cli_command_from(None, Some(Path::new("/usr/bin/python3"))),
            ["tandem"]
        );
        assert_eq!(cli_command_from(None, None), ["tandem"]);
    }
}
