//! Simulated hosts on one machine, for tests and benchmarks of what only breaks across machines:
//! addresses other than loopback, links with a bandwidth, a link cut with no RST and no FIN, a host
//! whose processes all die at once, and processes that cannot read each other's memory.
//!
//! Why namespaces: a test that runs every rank on 127.0.0.1 exercises none of that (same-host
//! copies carry the bytes, a dead peer resets its connections at once), and real machines are not
//! available to every test run. Each host here is a network namespace with one interface (`eth0`,
//! `10.77.0.<i+1>/24`) plugged into a bridge that lives in a namespace of its own (the switch); its
//! processes share a pid namespace of their own, so a probe by pid cannot find another host's
//! processes and the same-host data plane stays off between hosts, as between real machines. Links
//! can be shaped with `tbf` (the kernels these tests run on have no `netem`, so no added latency or
//! loss). The addresses exist only inside these namespaces; nothing is routed to or from them.
//!
//! Everything is undone when the [`Testbed`] is dropped (processes killed, namespaces deleted),
//! also when a test panics. Making namespaces needs root (CI runs as root); [`Testbed::new`] says
//! why when it cannot, and [`skip_reason`] lets a test honour `TANDEM_TESTBED=off`.
//!
//! ```no_run
//! use tandem_testbed::Testbed;
//! let bed = Testbed::new(2, Some("2gbit"))?;
//! let out = bed.command(1, "hostname", &["-I"]).output();
//! bed.cut(1)?;   // host 1 hears nothing any more, and nobody hears it
//! bed.heal(1)?;
//! # Ok::<(), tandem_core::Error>(())
//! ```
//!
//! Why namespaces and not containers: they need nothing but `ip` and root, start in milliseconds,
//! and are removed with the testbed (also when a test panics).

mod capture;

pub use capture::{Capture, contains};

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tandem_core::{Error, Result};

/// `off` skips the tests that need simulated hosts (they say so loudly).
pub const TESTBED_VAR: &str = tandem_core::settings::TESTBED.name;

/// The subnet of the simulated hosts (inside their namespaces only).
pub const SUBNET: &str = "10.77.0.0/24";

/// Why tests that need simulated hosts should not run here, if they should not: `TANDEM_TESTBED=off`.
/// Anything else (not root, no `ip`) is not a reason to skip: [`Testbed::new`] fails and says why.
pub fn skip_reason() -> Option<String> {
    (!tandem_core::settings::TESTBED.switch_or(true)).then(|| {
        format!(
            "{TESTBED_VAR}=off: the tests on simulated hosts were SKIPPED; nothing that crosses machines was tested"
        )
    })
}

/// Numbers testbeds within this process, so their names never collide.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// One simulated host.
#[derive(Debug)]
struct Host {
    /// Its network namespace.
    ns: String,
    /// The switch end of its link (in the switch namespace).
    port: String,
    /// PID 1 of its pid namespace (as seen from here), and the `unshare` that holds it.
    init: Option<(Child, u32)>,
}

/// H simulated hosts joined by a switch. Dropping it kills every process on them and deletes the
/// namespaces.
#[derive(Debug)]
pub struct Testbed {
    /// Names this testbed's namespaces and links.
    id: String,
    /// The bridge joining the hosts.
    switch: String,
    /// Its hosts.
    hosts: Vec<Host>,
}

/// Runs `program args`, an error naming `what` and its output when it fails.
fn run(what: &str, program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("{what}: running {program}"), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::config(
            "simulated hosts",
            format!(
                "{what}: `{program} {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ))
    }
}

impl Testbed {
    /// Makes `hosts` hosts (at most 200), each link shaped to `link` (`tc` rate syntax: `2gbit`,
    /// `10gbit`) when given. Fails, saying why, when namespaces cannot be made here.
    pub fn new(hosts: usize, link: Option<&str>) -> Result<Testbed> {
        if hosts == 0 || hosts > 200 {
            return Err(Error::invalid(
                "hosts",
                format!("{hosts} is not between 1 and 200"),
            ));
        }
        if !nix::unistd::geteuid().is_root() {
            return Err(Error::config(
                "simulated hosts",
                format!(
                    "making network namespaces needs root; run as root, or set {TESTBED_VAR}=off to skip these tests"
                ),
            ));
        }
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!(
            "{:06x}",
            ((std::process::id() & 0xffff) << 8 | (n & 0xff)) & 0xff_ffff
        );
        let switch = format!("tdm{id}sw");
        let mut bed = Testbed {
            id,
            switch,
            hosts: Vec::new(),
        };
        run("making the switch", "ip", &["netns", "add", &bed.switch])?;
        bed.ip_in(
            &bed.switch.clone(),
            &["link", "add", "br0", "type", "bridge"],
        )?;
        bed.ip_in(&bed.switch.clone(), &["link", "set", "br0", "up"])?;
        bed.ip_in(&bed.switch.clone(), &["link", "set", "lo", "up"])?;
        for i in 0..hosts {
            bed.add_host(i, link)?;
        }
        tracing::info!(hosts, id = %bed.id, "simulated hosts ready");
        Ok(bed)
    }

    /// Runs `ip args` inside namespace `ns`.
    fn ip_in(&self, ns: &str, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", ns];
        all.extend_from_slice(args);
        run("configuring the simulated hosts", "ip", &all)
    }

    /// Makes host `i`: its namespace, its veth pair to the switch, its address, and its link's
    /// shaping (`link`: a rate such as `1gbit`).
    fn add_host(&mut self, i: usize, link: Option<&str>) -> Result<()> {
        let ns = format!("tdm{}h{i}", self.id);
        let (inside, port) = (format!("t{}h{i}", self.id), format!("t{}s{i}", self.id));
        run("making a host", "ip", &["netns", "add", &ns])?;
        self.hosts.push(Host {
            ns: ns.clone(),
            port: port.clone(),
            init: None,
        });
        run(
            "making a link",
            "ip",
            &[
                "link", "add", &inside, "type", "veth", "peer", "name", &port,
            ],
        )?;
        run(
            "plugging a host",
            "ip",
            &["link", "set", &inside, "netns", &ns],
        )?;
        run(
            "plugging a host",
            "ip",
            &["link", "set", &port, "netns", &self.switch],
        )?;
        self.ip_in(&ns, &["link", "set", &inside, "name", "eth0"])?;
        let addr = format!("{}/24", self.addr(i));
        self.ip_in(&ns, &["addr", "add", &addr, "dev", "eth0"])?;
        self.ip_in(&ns, &["link", "set", "eth0", "up"])?;
        self.ip_in(&ns, &["link", "set", "lo", "up"])?;
        let switch = self.switch.clone();
        self.ip_in(&switch, &["link", "set", &port, "master", "br0"])?;
        self.ip_in(&switch, &["link", "set", &port, "up"])?;
        if let Some(rate) = link {
            // Both directions: the host's egress and the switch's egress towards it.
            for (n, dev) in [(ns.as_str(), "eth0"), (switch.as_str(), port.as_str())] {
                run(
                    "shaping a link",
                    "ip",
                    &[
                        "netns", "exec", n, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                        "rate", rate, "burst", "512kb", "latency", "20ms",
                    ],
                )?;
            }
        }
        self.start_init(i)
    }

    /// Starts PID 1 of host `i`'s pid namespace (a `sleep` that does nothing), which every process
    /// of the host then joins.
    fn start_init(&mut self, i: usize) -> Result<()> {
        let ns = self.hosts[i].ns.clone();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "unshare",
                "--pid",
                "--fork",
                "--mount-proc",
                "--kill-child",
                "--",
                "sleep",
                "infinity",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::io("starting a host's first process", e))?;
        // `ip netns exec` execs `unshare`, which forks the namespace's PID 1: find it.
        let inner = Self::pid_of(&child).ok_or_else(|| {
            Error::timeout(
                format!(
                    "host {i}'s first process to start (unshare pid {})",
                    child.id()
                ),
                Duration::from_secs(10),
            )
        })?;
        self.hosts[i].init = Some((child, inner));
        Ok(())
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether there are no hosts (never: [`Testbed::new`] makes at least one).
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Host `i`'s address.
    pub fn addr(&self, i: usize) -> String {
        format!("10.77.0.{}", i + 1)
    }

    /// The name of host `i`'s network namespace (for `ip netns exec`).
    pub fn namespace(&self, i: usize) -> &str {
        &self.hosts[i].ns
    }

    /// A command that runs `program args` on host `i` (its network, pid and mount namespaces), in
    /// this process's working directory. Stdin is null; configure the rest as usual.
    pub fn command<S: AsRef<std::ffi::OsStr>>(
        &self,
        i: usize,
        program: &str,
        args: &[S],
    ) -> Command {
        let target = self.hosts[i]
            .init
            .as_ref()
            .map_or(0, |(_, pid)| *pid)
            .to_string();
        // Entering the mount namespace moves to its root: keep this process's directory, so
        // relative paths mean the same on every host (they share this machine's files).
        let wd = std::env::current_dir()
            .map(|d| format!("--wd={}", d.display()))
            .unwrap_or_else(|_| "--wd=/".into());
        let mut c = Command::new("nsenter");
        c.args([
            "--target", &target, "--net", "--pid", "--mount", &wd, "--", program,
        ])
        .args(args)
        .stdin(Stdio::null());
        c
    }

    /// A command that runs `program args` in host `i`'s network namespace only (this machine's
    /// processes and files stay visible): for a launcher such as `mpirun` that starts processes on
    /// the other hosts through [`Testbed::write_rsh_agent`].
    pub fn net_command(&self, i: usize, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i].ns, program])
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// The process a [`Testbed::command`] started runs as a child of `nsenter` (which forks into the
    /// host's pid namespace): its pid as seen from here, to signal it. Waits up to 10 s for it.
    pub fn pid_of(child: &Child) -> Option<u32> {
        let outer = child.id();
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            let children = std::fs::read_to_string(format!("/proc/{outer}/task/{outer}/children"))
                .unwrap_or_default();
            if let Some(pid) = children
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
            {
                return Some(pid);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// Writes an executable script at `path` that runs `CMD...` on the host whose address is its
    /// first argument (`script 10.77.0.2 CMD...`): the "remote shell" mpirun expects
    /// (`--mca plm_rsh_agent path`), so MPI's daemons start on the simulated hosts.
    pub fn write_rsh_agent(&self, path: &std::path::Path) -> Result<()> {
        use std::fmt::Write as _;
        let mut script = String::from(
            "#!/bin/sh\n# Runs a command on a simulated host: AGENT ADDRESS CMD...\nhost=$1; shift\ncase \"$host\" in\n",
        );
        for (i, h) in self.hosts.iter().enumerate() {
            let pid = h.init.as_ref().map_or(0, |(_, p)| *p);
            let _ = writeln!(script, "  {}) t={pid} ;;", self.addr(i));
        }
        script.push_str("  *) echo \"no simulated host $host\" >&2; exit 1 ;;\nesac\nexec nsenter --target \"$t\" --net --pid --mount --wd=\"$PWD\" -- sh -c \"$*\"\n");
        std::fs::write(path, script)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| Error::io(format!("making {} executable", path.display()), e))
    }

    /// Cuts host `i` off the switch: packets are dropped both ways, with no RST and no FIN, as when
    /// a machine loses its network.
    pub fn cut(&self, i: usize) -> Result<()> {
        self.ip_in(&self.switch, &["link", "set", &self.hosts[i].port, "down"])
    }

    /// Plugs host `i` back in.
    pub fn heal(&self, i: usize) -> Result<()> {
        self.ip_in(&self.switch, &["link", "set", &self.hosts[i].port, "up"])
    }

    /// Kills every process on host `i` at once (its pid namespace's PID 1 dies, and the kernel
    /// kills the rest), as when a machine dies; the host is then empty and may run new processes.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        if let Some((mut child, inner)) = self.hosts[i].init.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(inner as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.kill();
            let _ = child.wait();
        }
        self.start_init(i)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            if let Some((mut child, inner)) = h.init.take() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(inner as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = run("removing a host", "ip", &["netns", "del", &h.ns]);
        }
        let _ = run("removing the switch", "ip", &["netns", "del", &self.switch]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_reach_each_other_only_through_the_switch_and_a_cut_isolates_one() {
        if let Some(why) = skip_reason() {
            eprintln!("{why}");
            return;
        }
        let bed = match Testbed::new(2, None) {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        };
        // A TCP connection from one host to a listener on another (python3, present wherever
        // Tandem's tests run): true when the listener answered.
        let reach = |from: usize, to: usize, port: u16, tries: u32| {
            let listen = format!(
                "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('{}',{port}));s.listen();s.settimeout(5);c,_=s.accept();c.send(b'ok')",
                bed.addr(to)
            );
            let mut server = bed
                .command(to, "python3", &["-c", &listen])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("listener");
            let connect = format!(
                "import socket,sys,time\nfor _ in range({tries}):\n try:\n  s=socket.create_connection(('{}',{port}),timeout=1);print(s.recv(2).decode());sys.exit(0)\n except OSError: time.sleep(0.05)\nsys.exit(1)",
                bed.addr(to)
            );
            let ok = bed
                .command(from, "python3", &["-c", &connect])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("ok"))
                .unwrap_or(false);
            let _ = server.kill();
            let _ = server.wait();
            ok
        };
        assert!(reach(0, 1, 7001, 40) && reach(1, 0, 7002, 40));
        bed.cut(1).expect("cut");
        assert!(!reach(0, 1, 7003, 2), "a cut host is unreachable");
        bed.heal(1).expect("heal");
        assert!(reach(0, 1, 7004, 40), "and reachable again once healed");
        // Each host has its own pid namespace: PID 1 there is its init.
        let out = bed
            .command(0, "sh", &["-c", "echo $$; cat /proc/1/comm"])
            .output()
            .expect("runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("sleep"), "{text}");
        // The remote-shell script runs a command on the host named by its address.
        let agent = std::env::temp_dir().join(format!("tdm-agent-{}", std::process::id()));
        bed.write_rsh_agent(&agent).expect("agent");
        let out = Command::new(&agent)
            .args([bed.addr(1).as_str(), "hostname", "-I"])
            .output()
            .expect("agent runs");
        let _ = std::fs::remove_file(&agent);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&bed.addr(1)), "{text}");
        let names: Vec<String> = (0..2).map(|i| bed.namespace(i).to_string()).collect();
        drop(bed);
        let list = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip");
        let list = String::from_utf8_lossy(&list.stdout);
        for n in names {
            assert!(!list.contains(&n), "{n} left behind");
        }
    }
}
