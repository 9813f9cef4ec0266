//! Recording what crosses the switch: every frame between the simulated hosts, as a pcap file
//! written by `tcpdump` in the switch's namespace, to check what an eavesdropper on the network
//! would see.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tandem_core::{Error, Result};

use crate::Testbed;

/// A running capture of the switch's traffic; [`Capture::finish`] stops it and returns the bytes.
#[derive(Debug)]
pub struct Capture {
    /// The capture's process, until stopped.
    child: Option<Child>,
    /// The capture file.
    file: PathBuf,
}

impl Testbed {
    /// Starts recording every frame on the switch (full frames), and returns once the recorder
    /// listens. Needs `tcpdump` (`apt-get install tcpdump`): the error says so when it is missing.
    pub fn capture(&self) -> Result<Capture> {
        let file = std::env::temp_dir().join(format!("tandem-capture-{}.pcap", self.id));
        let _ = std::fs::remove_file(&file);
        let file_arg = file.display().to_string();
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.switch,
                "tcpdump",
                "-i",
                "br0",
                "-s",
                "0",
                "-U",
            ])
            .args(["-Z", "root", "-w", &file_arg])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io("starting tcpdump in the switch's namespace", e))?;
        let err = child.stderr.take();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            if let Some(err) = err {
                for line in BufReader::new(err).lines().map_while(|l| l.ok()) {
                    let _ = tx.send(line);
                }
            }
        });
        let end = Instant::now() + Duration::from_secs(10);
        let mut said = Vec::new();
        loop {
            match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
                Ok(line) if line.contains("listening on") => {
                    return Ok(Capture {
                        child: Some(child),
                        file,
                    });
                }
                Ok(line) => said.push(line),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::config(
                        "tcpdump",
                        format!(
                            "did not start capturing within 10 s (is it installed? `apt-get install tcpdump`): {}",
                            said.join(" | ")
                        ),
                    ));
                }
            }
        }
    }
}

impl Capture {
    /// Stops recording and returns the pcap file's bytes (headers and frames).
    pub fn finish(mut self) -> Result<Vec<u8>> {
        if let Some(mut c) = self.child.take() {
            // SIGTERM lets tcpdump flush what it holds.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let bytes = std::fs::read(&self.file)
            .map_err(|e| Error::io(format!("reading {}", self.file.display()), e))?;
        let _ = std::fs::remove_file(&self.file);
        Ok(bytes)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
