//! Helpers shared by Tandem's multi-process integration tests: spawning the helper binary per rank
//! with a job's environment, and collecting what each rank reports, always under a deadline.

use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod check;
pub mod elastic;

/// How this run's jobs are secured (`TANDEM_TEST_TRANSPORT`): `tls` (the default) runs every
/// job with mutual TLS over TCP, every process holding a certificate of one CA made for this test
/// process, local sockets off; `local` gives the same certificates but leaves local sockets on,
/// as users get by default (processes of one machine then talk over Unix sockets, see
/// `tandem_tls::local`); `plain` runs every job in plaintext TCP (`TANDEM_INSECURE=1`). The
/// suites run every way (`scripts/test`).
pub fn tls_on() -> bool {
    transport() != "plain"
}

/// Whether this run leaves local sockets on (`TANDEM_TEST_TRANSPORT=local`, see [`tls_on`]).
pub fn local_on() -> bool {
    transport() == "local"
}

fn transport() -> String {
    std::env::var("TANDEM_TEST_TRANSPORT").unwrap_or_else(|_| "tls".into())
}

/// Local sockets off: what a test of TLS (or of plaintext TCP) gives its processes.
fn tcp_only() -> (String, String) {
    (tandem_tls::local::LOCAL_VAR.into(), "0".into())
}

/// The folder with this test process's `ca.pem`, `cert.pem` and `key.pem` (made once).
fn tls_dir() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::env::temp_dir().join("tandem-tests-tls");
        // Folders of test processes that are gone.
        if let Ok(entries) = std::fs::read_dir(&base) {
            for e in entries.flatten() {
                let pid = e.file_name().to_string_lossy().into_owned();
                if !std::path::Path::new("/proc").join(&pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = base.join(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&dir);
        let names = ["localhost".to_string(), "127.0.0.1".to_string()];
        if let Err(e) = tandem_tls::init(&dir, None, "tandem-tests", &names, 1) {
            panic!("making the test CA in {}: {e}", dir.display());
        }
        dir
    })
}

/// The variables that give a process this test process's certificates and TLS on every
/// connection, local sockets off, whatever the run's transport (for tests of TLS itself).
pub fn tls_env() -> Vec<(String, String)> {
    vec![
        (tandem_tls::DIR_VAR.into(), tls_dir().display().to_string()),
        tcp_only(),
    ]
}

/// The variables that give a spawned process this run's transport (see [`tls_on`]).
pub fn transport_env() -> Vec<(String, String)> {
    match transport().as_str() {
        "plain" => vec![(tandem_tls::INSECURE_VAR.into(), "1".into()), tcp_only()],
        "local" => vec![
            (tandem_tls::DIR_VAR.into(), tls_dir().display().to_string()),
            (tandem_tls::local::LOCAL_VAR.into(), "1".into()),
        ],
        _ => tls_env(),
    }
}

/// This run's transport for servers and clients the test process runs itself.
pub fn security() -> tandem_tls::Security {
    if !tls_on() {
        return tandem_tls::Security::Plaintext { insecure: true };
    }
    let files = tandem_tls::TlsFiles {
        ca: tls_dir().join(tandem_tls::CA_FILE),
        cert: tls_dir().join(tandem_tls::CERT_FILE),
        key: tls_dir().join(tandem_tls::KEY_FILE),
    };
    match tandem_tls::TlsContext::load(&files) {
        Ok(c) => tandem_tls::Security::tls(c),
        Err(e) => panic!("loading the test certificates: {e}"),
    }
}

/// A gRPC channel to `addr` secured with this run's transport (for tests that speak the
/// protocol by hand).
pub async fn channel(addr: &str) -> tonic::transport::Channel {
    let connector = tandem_tls::grpc::Connector::new(security());
    let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{addr}")) {
        Ok(e) => e,
        Err(e) => panic!("endpoint {addr}: {e}"),
    };
    match endpoint.connect_with_connector(connector).await {
        Ok(c) => c,
        Err(e) => panic!("connecting to {addr}: {e}"),
    }
}

/// A raw gRPC client of the parameter server at `addr`, sending the job's `token` on every call
/// as workers do (for tests that speak the protocol themselves).
pub async fn ps_client(
    addr: &str,
    token: &str,
) -> tandem_ps::pb::parameter_server_client::ParameterServerClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        tandem::rendezvous::AttachToken,
    >,
> {
    let header = match format!("Bearer {token}").parse() {
        Ok(h) => h,
        Err(e) => panic!("token {token:?} is no header value: {e}"),
    };
    tandem_ps::pb::parameter_server_client::ParameterServerClient::with_interceptor(
        channel(addr).await,
        tandem::rendezvous::AttachToken::from_token(header),
    )
}

/// The helper binary's arguments for worker 0 of a one-worker sync job of `steps` steps against
/// the parameter server at `addr` (a run that must train, or be refused).
pub fn sync_worker_args(addr: &str, steps: u32) -> Vec<String> {
    [
        "ps-worker",
        "--servers",
        addr,
        "--worker",
        "0",
        "--workers",
        "1",
        "--mode",
        "sync",
        "--steps",
        &steps.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// The environment of a parameter-server process of a test job: the token and the data plane.
pub fn ps_env(token: &str, same_host: &str) -> Vec<(String, String)> {
    vec![
        ("TANDEM_JOB_TOKEN".to_string(), token.to_string()),
        ("TANDEM_SAME_HOST".to_string(), same_host.to_string()),
    ]
}

/// Starts `node ps-server args` (the test helper binary) and returns it with the address it
/// printed (within two minutes).
pub fn start_ps_server(node: &str, token: &str, args: &[&str], same_host: &str) -> (Child, String) {
    start_ps_server_env(node, args, &ps_env(token, same_host))
}

/// [`start_ps_server`] with the whole environment given (`ps_env` and more).
pub fn start_ps_server_env(node: &str, args: &[&str], env: &[(String, String)]) -> (Child, String) {
    let mut all = vec!["ps-server"];
    all.extend_from_slice(args);
    let mut c = spawn(node, &all, env);
    let lines = stdout_lines(&mut c);
    let addr = loop {
        match lines.recv_timeout(Duration::from_secs(120)) {
            Ok(line) => {
                if let Some(a) = line.strip_prefix("ADDR ") {
                    break a.to_string();
                }
            }
            Err(_) => panic!("the server printed no address"),
        }
    };
    (c, addr)
}

/// The environment of one rank of a local job (Tandem's own variables, so no other launcher
/// interferes), with this run's transport.
pub fn rank_env(rank: usize, world: usize, rendezvous: &str, token: &str) -> Vec<(String, String)> {
    let mut env = vec![
        ("TANDEM_LAUNCHER".into(), "tandem".into()),
        ("TANDEM_RANK".into(), rank.to_string()),
        ("TANDEM_WORLD_SIZE".into(), world.to_string()),
        ("TANDEM_LOCAL_RANK".into(), rank.to_string()),
        ("TANDEM_LOCAL_WORLD_SIZE".into(), world.to_string()),
        ("TANDEM_RENDEZVOUS_ADDR".into(), rendezvous.into()),
        ("TANDEM_JOB_TOKEN".into(), token.into()),
    ];
    env.extend(transport_env());
    env
}

/// Starts `exe args` with `env` added (and this run's transport, unless `env` names one: then
/// over TCP unless it says otherwise), stdout and stderr captured.
pub fn spawn<S: AsRef<std::ffi::OsStr>>(exe: &str, args: &[S], env: &[(String, String)]) -> Child {
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let names_transport = env
        .iter()
        .any(|(k, _)| k.starts_with("TANDEM_TLS") || k == tandem_tls::INSECURE_VAR);
    if !names_transport {
        cmd.envs(transport_env());
    } else if !env.iter().any(|(k, _)| k == tandem_tls::local::LOCAL_VAR) {
        // A test that sets up TLS (or plaintext) itself tests it: over TCP.
        cmd.envs([tcp_only()]);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    match cmd.spawn() {
        Ok(c) => c,
        Err(e) => panic!("cannot start {exe}: {e}"),
    }
}

/// Waits for a child at most `timeout`, killing it after that; returns its output either way.
/// Output is drained while the child runs, so a chatty child never blocks on a full pipe.
pub fn wait_output(mut child: Child, timeout: Duration) -> Output {
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let end = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() >= end => {
                let _ = child.kill();
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for a child failed: {e}"),
        }
    }
    let status = match child.wait() {
        Ok(s) => s,
        Err(e) => panic!("waiting for a child failed: {e}"),
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Waits for every child concurrently (each drained from the start), in rank order.
pub fn wait_all(children: Vec<Child>, timeout: Duration) -> Vec<Output> {
    let handles: Vec<_> = children
        .into_iter()
        .map(|c| std::thread::spawn(move || wait_output(c, timeout)))
        .collect();
    handles
        .into_iter()
        .map(|h| match h.join() {
            Ok(o) => o,
            Err(_) => panic!("a waiting thread panicked"),
        })
        .collect()
}

/// The JSON after `RESULT ` on a child's stdout.
pub fn result_json(out: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find_map(|l| l.strip_prefix("RESULT "));
    match line.map(serde_json::from_str) {
        Some(Ok(v)) => v,
        _ => panic!(
            "no RESULT line (status {}):\nstdout:\n{text}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Takes a child's stdout and forwards its lines through a channel, so a test can wait for one line
/// with a deadline.
pub fn stdout_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(out) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

/// Deterministic test data, computed identically by the ranks and by the test's reference.
pub mod data {
    use tandem::{DType, ReduceOp};

    fn splitmix(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Values of rank `rank` for a case: exactly representable in `dtype`, and chosen so that sums
    /// (and products, for `Prod`) over five ranks stay exact, so the reference can be exact too.
    pub fn values(
        seed: u64,
        rank: usize,
        len: usize,
        dtype: DType,
        op: Option<ReduceOp>,
    ) -> Vec<f64> {
        let mut s = seed ^ ((rank as u64 + 1) << 32);
        (0..len)
            .map(|_| {
                let r = splitmix(&mut s);
                match (op, dtype) {
                    (Some(ReduceOp::Prod), DType::U8) => (1 + r % 2) as f64,
                    (Some(ReduceOp::Prod), _) => [-2.0, -1.0, 1.0, 2.0][(r % 4) as usize],
                    (_, DType::U8) => (r % 50) as f64,
                    (_, d) if d.is_float() => ((r % 65) as f64 - 32.0) / 4.0,
                    _ => (r % 17) as f64 - 8.0,
                }
            })
            .collect()
    }

    /// Encodes values as little-endian elements of `dtype`.
    pub fn to_bytes(dtype: DType, v: &[f64]) -> Vec<u8> {
        let mut out = Vec::with_capacity(v.len() * dtype.size());
        for &x in v {
            match dtype {
                DType::F32 => out.extend_from_slice(&(x as f32).to_le_bytes()),
                DType::F64 => out.extend_from_slice(&x.to_le_bytes()),
                DType::F16 => out.extend_from_slice(&half::f16::from_f64(x).to_le_bytes()),
                DType::BF16 => out.extend_from_slice(&half::bf16::from_f64(x).to_le_bytes()),
                DType::I32 => out.extend_from_slice(&(x as i32).to_le_bytes()),
                DType::I64 => out.extend_from_slice(&(x as i64).to_le_bytes()),
                DType::U8 => out.push(x as u8),
                _ => {}
            }
        }
        out
    }

    /// Decodes little-endian elements of `dtype` to f64.
    pub fn from_bytes(dtype: DType, b: &[u8]) -> Vec<f64> {
        b.chunks_exact(dtype.size())
            .map(|c| match dtype {
                DType::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64,
                DType::F64 => f64::from_le_bytes(c.try_into().unwrap_or_default()),
                DType::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f64(),
                DType::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f64(),
                DType::I32 => i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64,
                DType::I64 => i64::from_le_bytes(c.try_into().unwrap_or_default()) as f64,
                DType::U8 => c[0] as f64,
                _ => f64::NAN,
            })
            .collect()
    }

    /// Rounds an exact value to what `dtype` can hold (integers truncate toward zero).
    pub fn round(dtype: DType, x: f64) -> f64 {
        from_bytes(dtype, &to_bytes(dtype, &[x]))[0]
    }

    /// The exact element-wise reduction of every rank's values, rounded once to `dtype`.
    pub fn reference(dtype: DType, op: ReduceOp, ranks: &[Vec<f64>]) -> Vec<f64> {
        let n = ranks.len();
        let len = ranks.first().map_or(0, Vec::len);
        (0..len)
            .map(|i| {
                let col = ranks.iter().map(|r| r[i]);
                let v = match op {
                    ReduceOp::Sum => col.sum(),
                    ReduceOp::Prod => col.product(),
                    ReduceOp::Min => col.fold(f64::INFINITY, f64::min),
                    ReduceOp::Max => col.fold(f64::NEG_INFINITY, f64::max),
                    _ => {
                        let s: f64 = col.sum();
                        if dtype.is_float() {
                            s / n as f64
                        } else {
                            (s / n as f64).trunc()
                        }
                    }
                };
                round(dtype, v)
            })
            .collect()
    }
}

/// The cases the collective suite runs, identical on every rank and in the test.
pub mod suite {
    use tandem::{DType, ReduceOp};

    /// One operation of the suite.
    #[derive(Debug, Clone)]
    pub struct Case {
        /// Index, also the seed.
        pub id: usize,
        /// `allreduce`, `reduce_scatter`, `reduce`, `broadcast`, `allgather`, `sendrecv`, `barrier`.
        pub kind: &'static str,
        /// Element type.
        pub dtype: DType,
        /// Reduce operator, where it applies.
        pub op: Option<ReduceOp>,
        /// Elements per rank.
        pub len: usize,
        /// Root, where it applies.
        pub root: usize,
    }

    /// Every op × dtype × reduce op at lengths 0, 1, odd and not divisible by the world, plus a
    /// length that spans many pipeline segments.
    pub fn cases(world: usize) -> Vec<Case> {
        let mut out = Vec::new();
        let mut push = |kind, dtype, op, len, root| {
            let id = out.len();
            out.push(Case {
                id,
                kind,
                dtype,
                op,
                len,
                root,
            });
        };
        for dtype in DType::ALL {
            for op in ReduceOp::ALL {
                for len in [0, 1, 7, 1003] {
                    push("allreduce", dtype, Some(op), len, 0);
                }
                for len in [5, 1003] {
                    push("reduce_scatter", dtype, Some(op), len, 0);
                }
            }
            for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Avg] {
                push("reduce", dtype, Some(op), 1003, world - 1);
            }
            for len in [0, 1, 1003] {
                push("broadcast", dtype, None, len, 1 % world);
                push("allgather", dtype, None, len, 0);
            }
            push("sendrecv", dtype, None, 333, 0);
        }
        push("allreduce", DType::F32, Some(ReduceOp::Sum), 300_007, 0);
        push("broadcast", DType::F64, None, 100_003, world / 2);
        push("allgather", DType::I32, None, 50_001, 0);
        push("barrier", DType::U8, None, 0, 0);
        out
    }
}

/// Linear regression for the parameter-server tests: data, gradients and the single-process
/// reference, all in f32 with a fixed order of operations so results can be compared bit for bit.
pub mod linreg {
    /// Features per example.
    pub const DIM: usize = 16;
    /// Examples per worker.
    pub const ROWS: usize = 64;

    /// The true weights and bias.
    pub fn truth() -> (Vec<f32>, f32) {
        ((0..DIM).map(|i| (i as f32 - 7.5) / 4.0).collect(), 0.75)
    }

    /// Worker `w`'s examples: features and noise-free targets.
    pub fn shard(w: usize) -> (Vec<f32>, Vec<f32>) {
        let (wt, bt) = truth();
        let mut s = 0x5EED_u64 ^ ((w as u64 + 1) << 20);
        let mut next = || {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let x: Vec<f32> = (0..ROWS * DIM).map(|_| next()).collect();
        let y = (0..ROWS)
            .map(|r| {
                x[r * DIM..(r + 1) * DIM]
                    .iter()
                    .zip(&wt)
                    .map(|(a, b)| a * b)
                    .sum::<f32>()
                    + bt
            })
            .collect();
        (x, y)
    }

    /// A gradient that depends on the step only, in multiples of 1/4 small enough that sums and
    /// means of equal gradients are exact: whichever workers took part in a step, its average is
    /// this, so the result of a run is known in advance ([`const_grad_result`]).
    pub fn const_grad(step: u64) -> (Vec<f32>, f32) {
        let c = (step % 7 + 1) as f32;
        let w = (0..DIM).map(|i| 0.25 * (c + (i % 4) as f32)).collect();
        (w, 0.25 * c)
    }

    /// The parameters after `steps` sync steps of plain SGD with rate `lr` from zeros on
    /// [`const_grad`], each step applied once: computed step by step, in f32, like a server.
    pub fn const_grad_result(steps: u64, lr: f32) -> (Vec<f32>, f32) {
        let (mut w, mut b) = (vec![0.0f32; DIM], 0.0f32);
        for s in 0..steps {
            let (gw, gb) = const_grad(s);
            w.iter_mut().zip(&gw).for_each(|(x, g)| *x -= lr * g);
            b -= lr * gb;
        }
        (w, b)
    }

    /// Mean-squared-error gradient of `(w, b)` on worker `shard`'s data.
    pub fn grad(w: &[f32], b: f32, shard: &(Vec<f32>, Vec<f32>)) -> (Vec<f32>, f32) {
        let (x, y) = shard;
        let mut gw = vec![0.0f32; DIM];
        let mut gb = 0.0f32;
        for r in 0..ROWS {
            let row = &x[r * DIM..(r + 1) * DIM];
            let err = row.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() + b - y[r];
            for (g, a) in gw.iter_mut().zip(row) {
                *g += 2.0 * err * a / ROWS as f32;
            }
            gb += 2.0 * err / ROWS as f32;
        }
        (gw, gb)
    }

    /// Synchronous SGD as one process: sum the workers' gradients in worker order, divide by their
    /// number, step. The servers compute the same, summing in arrival order.
    pub fn reference_sync(workers: usize, steps: usize, lr: f32) -> (Vec<f32>, f32) {
        reference_sync_by(workers, steps, lr, |x| x, |_, _, _| {})
    }

    /// [`reference_sync`] through a lossy wire: each worker computes its gradient on `view` of
    /// the master weights (what it pulled), `send(worker, gw, gb)` turns the gradient into what
    /// reaches the servers (rounded, sparsified; its state is the caller's), the servers average
    /// and step on f32 masters. Returns `view` of the final masters, as a worker pulls them.
    pub fn reference_sync_by(
        workers: usize,
        steps: usize,
        lr: f32,
        view: impl Fn(f32) -> f32,
        mut send: impl FnMut(usize, &mut Vec<f32>, &mut f32),
    ) -> (Vec<f32>, f32) {
        let shards: Vec<_> = (0..workers).map(shard).collect();
        let (mut w, mut b) = (vec![0.0f32; DIM], 0.0f32);
        for _ in 0..steps {
            let seen: Vec<f32> = w.iter().map(|x| view(*x)).collect();
            let grads: Vec<_> = shards
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let (mut gw, mut gb) = grad(&seen, view(b), s);
                    send(i, &mut gw, &mut gb);
                    (gw, gb)
                })
                .collect();
            let mut gw = grads[0].0.clone();
            let mut gb = grads[0].1;
            for g in &grads[1..] {
                gw.iter_mut().zip(&g.0).for_each(|(a, x)| *a += x);
                gb += g.1;
            }
            gw.iter_mut().for_each(|a| *a /= workers as f32);
            gb /= workers as f32;
            w.iter_mut().zip(&gw).for_each(|(p, g)| *p -= lr * g);
            b -= lr * gb;
        }
        (w.iter().map(|x| view(*x)).collect(), view(b))
    }

    /// Top-k with error feedback as a worker applies it to one whole tensor: `acc` is gradient
    /// plus residual; the `ceil(len * fraction)` elements largest in magnitude (ties to the lower
    /// index) stay, the rest become the new residual and are zeroed. Where the (index, value)
    /// pairs would not be smaller than the tensor, all of it is sent and nothing kept.
    pub fn top_k_with_feedback(g: &mut [f32], residual: &mut Vec<f32>, fraction: f64) {
        if residual.len() != g.len() {
            *residual = vec![0.0; g.len()];
        }
        let n = g.len();
        for (a, r) in g.iter_mut().zip(residual.iter()) {
            *a += r;
        }
        let k = ((n as f64 * fraction).ceil() as usize).clamp(1, n);
        if k * 8 >= n * 4 {
            residual.iter_mut().for_each(|r| *r = 0.0);
            return;
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()).then(a.cmp(&b)));
        let kept: std::collections::HashSet<usize> = order[..k].iter().copied().collect();
        for i in 0..n {
            if kept.contains(&i) {
                residual[i] = 0.0;
            } else {
                residual[i] = g[i];
                g[i] = 0.0;
            }
        }
    }
}
