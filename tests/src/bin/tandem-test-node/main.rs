//! Helper binary for the multi-process tests: one rank of a job, driven by its environment.
//!
//! Modes:
//! - `meet [--host] [--timeout SECS]`: joins the rendezvous, publishes a value, reads everyone's,
//!   counts, passes a barrier and prints `RESULT {json}`. With `--host` it hosts the rendezvous on an
//!   ephemeral port and prints `ADDR host:port` first.
//! - `suite`: forms a process group and runs every case of `tandem_tests::suite`, printing
//!   `CASE id [values]` for each.
//! - `async`: eight async allreduces in flight, then `CASE id [values]` for each.
//! - `compressed LEN COLS`: gradient allreduces of LEN f32 (a COLS-wide matrix for PowerSGD)
//!   under each compression, printing `COMPRESSED name step [values]`, then the refusals
//!   (`REFUSED what message`).
//! - `auto LEN...`: in a group formed with `auto` compression, prints `AUTO chosen none_secs
//!   bf16_secs` (the probe's times, `-` where nothing was measured), then for each LEN
//!   `AUTOSUM LEN [values]`: an `auto` allreduce (sum) of LEN elements, rank r contributing
//!   r + 1 + (i % 4) / 1024 (exact in f32, not in bf16).
//! - `halfbig LEN`: a bf16 allreduce of LEN values (pieces when large), printing `HALFBIG
//!   worst fnv` (the worst error in units of its bound, a hash of the result).
//! - `loop`: allreduces until something fails, printing `ITER i` after each.
//! - `mismatch --odd R`: rank R calls broadcast(f32 x 10, root 0) while the others call
//!   allreduce(f32 x 12, sum).
//!
//! Errors print `ERROR kind message`; the collective modes then try one more operation and print
//! `AFTER message`, and exit with status 3.

use std::time::Duration;

use tandem::cluster::ClusterSpec;
use tandem::rendezvous::{Host, JobToken, ServerConfig, Session};
use tandem::{DType, Error, ProcessGroup, ReduceOp, Result, TensorMut};
use tandem_tests::{data, suite};

mod elastic;
mod ps;

use elastic::run_elastic;
use ps::{ps_big, ps_server, ps_sparse, ps_worker};

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("meet") => runtime().and_then(|rt| rt.block_on(meet(&args[1..]))),
        Some("suite") => collective(run_suite),
        Some("async") => collective(run_async),
        Some("big") => collective(|pg| run_big(pg, &args[1..])),
        Some("compressed") => collective(|pg| run_compressed(pg, &args[1..])),
        Some("auto") => collective(|pg| run_auto(pg, &args[1..])),
        Some("halfbig") => collective(|pg| run_half_big(pg, &args[1..])),
        Some("loop") => collective(|pg| run_loop(pg, &args[1..])),
        Some("straggle") => collective(|pg| run_straggle(pg, &args[1..])),
        Some("mismatch") => collective(|pg| run_mismatch(pg, &args[1..])),
        Some("stall") => collective(|pg| run_stall(pg, &args[1..])),
        Some("agree") => collective(|pg| run_agree(pg, &args[1..])),
        Some("elastic") => run_elastic(&args[1..]),
        Some("rendezvous") => runtime().and_then(|rt| rt.block_on(rendezvous(&args[1..]))),
        Some("ps-server") => runtime().and_then(|rt| rt.block_on(ps_server(&args[1..]))),
        Some("ps-big") => runtime().and_then(|rt| rt.block_on(ps_big(&args[1..]))),
        Some("ps-sparse") => runtime().and_then(|rt| rt.block_on(ps_sparse(&args[1..]))),
        Some("ps-worker") => runtime().and_then(|rt| rt.block_on(ps_worker(&args[1..]))),
        other => Err(Error::invalid("mode", format!("unknown mode {other:?}"))),
    };
    if let Err(e) = r {
        println!("ERROR {} {e}", e.kind());
        eprintln!("{e}");
        std::process::exit(3);
    }
}

/// A rendezvous for other processes (an elastic job's, which outlives its members): `--bind ADDR`;
/// prints `ADDR host:port` and serves for `--seconds S` (default 300) or until killed.
async fn rendezvous(args: &[String]) -> Result<()> {
    let token = tandem::rendezvous::JobToken::from_env()?
        .ok_or_else(|| Error::config("TANDEM_JOB_TOKEN", "not set"))?;
    let bind = flag_value(args, "--bind").unwrap_or_else(|| "127.0.0.1:0".into());
    let seconds: u64 = flag_value(args, "--seconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let host =
        tandem::rendezvous::Host::bind(&bind, tandem::rendezvous::ServerConfig::new(token)).await?;
    println!("ADDR {}", host.addr());
    tokio::time::sleep(std::time::Duration::from_secs(seconds)).await;
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("runtime", e))
}

fn flag_value(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// Forms the group, runs `f`; on failure prints the error, tries one more op and prints that too.
fn collective(f: impl FnOnce(&ProcessGroup) -> Result<()>) -> Result<()> {
    let pg = ProcessGroup::from_env()?;
    match f(&pg) {
        Ok(()) => pg.shutdown(),
        Err(e) => {
            println!("ERROR {} {e}", e.kind());
            let after = pg
                .allreduce(&mut [1.0f32], ReduceOp::Sum)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            println!("AFTER {after}");
            std::process::exit(3);
        }
    }
}

fn print_case(id: usize, values: &[f64]) {
    let json = serde_json::to_string(values).unwrap_or_default();
    println!("CASE {id} {json}");
}

fn run_suite(pg: &ProcessGroup) -> Result<()> {
    let (rank, world) = (pg.rank(), pg.world_size());
    println!("SAMEHOST {}", u8::from(pg.same_host()));
    let links = pg.links();
    println!("LINKS {} {} {}", links.local, links.tls, links.plain);
    for case in suite::cases(world) {
        let size = case.dtype.size();
        let mine = data::values(case.id as u64, rank, case.len, case.dtype, case.op);
        let mut buf = data::to_bytes(case.dtype, &mine);
        let op = case.op.unwrap_or(ReduceOp::Sum);
        eprintln!(
            "case {} {} {} {:?} len {}",
            case.id, case.kind, case.dtype, case.op, case.len
        );
        match case.kind {
            "allreduce" => {
                pg.allreduce_bytes(&mut buf, case.dtype, op)?;
                print_case(case.id, &data::from_bytes(case.dtype, &buf));
            }
            "reduce_scatter" => {
                let r = pg.reduce_scatter_bytes(&mut buf, case.dtype, op)?;
                let mut out = vec![r.start as f64];
                out.extend(data::from_bytes(
                    case.dtype,
                    &buf[r.start * size..r.end * size],
                ));
                print_case(case.id, &out);
            }
            "reduce" => {
                pg.reduce_bytes(&mut buf, case.dtype, op, case.root)?;
                if rank == case.root {
                    print_case(case.id, &data::from_bytes(case.dtype, &buf));
                }
            }
            "broadcast" => {
                pg.broadcast_bytes(&mut buf, case.dtype, case.root)?;
                print_case(case.id, &data::from_bytes(case.dtype, &buf));
            }
            "allgather" => {
                let mut out = vec![0u8; buf.len() * world];
                pg.allgather_bytes(&buf, &mut out, case.dtype)?;
                print_case(case.id, &data::from_bytes(case.dtype, &out));
            }
            "sendrecv" if world > 1 => {
                let (right, left) = ((rank + 1) % world, (rank + world - 1) % world);
                let mut got = vec![0u8; buf.len()];
                if rank % 2 == 0 {
                    pg.send_bytes(&buf, case.dtype, right)?;
                    pg.recv_bytes(&mut got, case.dtype, left)?;
                } else {
                    pg.recv_bytes(&mut got, case.dtype, left)?;
                    pg.send_bytes(&buf, case.dtype, right)?;
                }
                print_case(case.id, &data::from_bytes(case.dtype, &got));
            }
            "barrier" => {
                pg.barrier()?;
                print_case(case.id, &[]);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Allreduces `[len]` f32 (sum) and f64 (average) values large enough to be cut into pieces and
/// checks every element against sums computed here from every rank's inputs; prints
/// `BIG <f32 mismatches> <f64 mismatches>`.
/// The gradient of rank `r` at element `i` in the compression tests (also computed by the test).
fn compressed_value(r: usize, i: usize) -> f32 {
    (((i * 37 + r * 101) % 997) as f32 / 997.0 - 0.5) * (1.0 + (i % 7) as f32)
}

fn run_compressed(pg: &ProcessGroup, args: &[String]) -> Result<()> {
    use tandem::collective::compression::{Compression, Compressor};
    let num = |i: usize, what: &str| -> Result<usize> {
        args.get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::invalid(what, "compressed LEN COLS"))
    };
    let (len, cols) = (num(0, "len")?, num(1, "cols")?);
    let rank = pg.rank();
    let grad = || -> Vec<f32> { (0..len).map(|i| compressed_value(rank, i)).collect() };
    let settings = [
        ("fp16", ReduceOp::Sum, 1),
        ("bf16", ReduceOp::Sum, 1),
        ("bf16", ReduceOp::Avg, 1),
        ("topk:0.25", ReduceOp::Sum, 2),
        ("powersgd:2", ReduceOp::Avg, 2),
        (&*format!("powersgd:{cols}"), ReduceOp::Sum, 1),
    ];
    for (name, op, steps) in settings {
        let mut c = Compressor::new(name.parse::<Compression>()?).with_columns(cols);
        for step in 0..steps {
            let mut g = grad();
            pg.allreduce_compressed(&mut g, op, &mut c)?;
            println!(
                "COMPRESSED {name}/{op:?} {step} {}",
                serde_json::to_string(&g).unwrap_or_default()
            );
        }
    }
    // Refusals, before anything is sent: an operator top-k cannot compute, a compressor reused
    // for a tensor of another length.
    let mut c = Compressor::new("topk:0.5".parse::<Compression>()?);
    if let Err(e) = pg.allreduce_compressed(&mut grad(), ReduceOp::Max, &mut c) {
        println!("REFUSED max {e}");
    }
    pg.allreduce_compressed(&mut grad(), ReduceOp::Sum, &mut c)?;
    if let Err(e) = pg.allreduce_compressed(&mut vec![1.0; len + 1], ReduceOp::Sum, &mut c) {
        println!("REFUSED length {e}");
    }
    Ok(())
}

/// `halfbig LEN`: a bf16 allreduce (sum) of LEN values large enough to go in pieces; prints
/// `HALFBIG worst fnv`: the largest error against the exact sum in units of the bound (each input
/// and each hop's sum rounded once: 2 × world × 2^-8 × the inputs' magnitudes; at most 1 when
/// right), and a hash of the result's bits (the same on every rank when the ranks agree).
fn run_half_big(pg: &ProcessGroup, args: &[String]) -> Result<()> {
    use tandem::collective::compression::{Compression, Compressor};
    let len: usize = args
        .first()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::invalid("len", "halfbig LEN"))?;
    let (rank, world) = (pg.rank(), pg.world_size());
    let mut g: Vec<f32> = (0..len).map(|i| compressed_value(rank, i)).collect();
    pg.allreduce_compressed(
        &mut g,
        ReduceOp::Sum,
        &mut Compressor::new(Compression::Bf16),
    )?;
    let mut worst = 0f64;
    let mut fnv: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, v) in g.iter().enumerate() {
        let exact: f64 = (0..world).map(|r| compressed_value(r, i) as f64).sum();
        let magnitude: f64 = (0..world)
            .map(|r| (compressed_value(r, i) as f64).abs())
            .sum();
        let bound = 2.0 * world as f64 * 2f64.powi(-8) * magnitude;
        worst = worst.max((*v as f64 - exact).abs() / bound.max(f64::MIN_POSITIVE));
        fnv = (fnv ^ u64::from(v.to_bits())).wrapping_mul(0x100_0000_01b3);
    }
    println!("HALFBIG {worst} {fnv:016x}");
    Ok(())
}

fn run_auto(pg: &ProcessGroup, args: &[String]) -> Result<()> {
    use tandem::collective::compression::Compression;
    let lens: Vec<usize> = args.iter().filter_map(|v| v.parse().ok()).collect();
    if lens.is_empty() || lens.len() != args.len() {
        return Err(Error::invalid("len", "auto LEN [LEN ...]"));
    }
    if pg.compression() != Compression::Auto {
        return Err(Error::invalid(
            "TANDEM_COMPRESSION",
            "the auto mode wants auto",
        ));
    }
    let choice = pg.auto_compression()?;
    let secs = |s: Option<f64>| s.map_or("-".to_string(), |s| format!("{s:e}"));
    println!(
        "AUTO {} {} {}",
        choice.chosen,
        secs(choice.none_secs),
        secs(choice.bf16_secs)
    );
    let rank = pg.rank();
    for len in lens {
        // r + 1 + (i % 4) / 1024: exact in f32 (and so are the sums), not in bf16.
        let mut g: Vec<f32> = (0..len)
            .map(|i| (rank + 1) as f32 + (i % 4) as f32 / 1024.0)
            .collect();
        let mut c = pg.compressor();
        pg.allreduce_compressed(&mut g, ReduceOp::Sum, &mut c)?;
        println!(
            "AUTOSUM {len} {}",
            serde_json::to_string(&g).unwrap_or_default()
        );
    }
    Ok(())
}

fn run_big(pg: &ProcessGroup, args: &[String]) -> Result<()> {
    let len: usize = args
        .first()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::invalid("len", "big LEN"))?;
    let (rank, world) = (pg.rank(), pg.world_size());
    // Small integers: every partial sum is exact in f32, whatever the order of additions.
    let value = |r: usize, i: usize| ((i * 7 + r * 13) % 101) as f64 - 50.0;
    let want = |i: usize| (0..world).map(|r| value(r, i)).sum::<f64>();
    let mut a: Vec<f32> = (0..len).map(|i| value(rank, i) as f32).collect();
    pg.allreduce(&mut a, ReduceOp::Sum)?;
    let bad32 = (0..len).filter(|&i| f64::from(a[i]) != want(i)).count();
    let mut b: Vec<f64> = (0..len).map(|i| value(rank, i)).collect();
    pg.allreduce(&mut b, ReduceOp::Avg)?;
    let w = world as f64;
    let bad64 = (0..len)
        .filter(|&i| (b[i] - want(i) / w).abs() > 1e-12 * want(i).abs().max(1.0))
        .count();
    // A broadcast from the last rank: every rank ends with its values.
    let root = world - 1;
    let mut c: Vec<f32> = (0..len).map(|i| value(rank, i) as f32).collect();
    pg.broadcast(&mut c, root)?;
    let bad_bcast = (0..len)
        .filter(|&i| f64::from(c[i]) != value(root, i))
        .count();
    println!("BIG {bad32} {bad64} {bad_bcast}");
    let busy = busy_sockets(1 << 20);
    println!("BUSY {}", busy.len());
    let mut congestion: Vec<String> = busy
        .into_iter()
        .map(|fd| tandem::observe::tcp_congestion(fd).unwrap_or_else(|| "?".into()))
        .collect();
    congestion.sort();
    congestion.dedup();
    println!("CONGESTION {}", congestion.join(","));
    Ok(())
}

/// This process's TCP sockets that received more than `min` bytes: the connections the
/// collectives above moved their bytes over (one per stream from the left neighbour on a ring).
fn busy_sockets(min: u64) -> Vec<std::os::fd::RawFd> {
    use std::os::fd::RawFd;
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<RawFd>().ok())
        .filter(|fd| tandem::observe::tcp_bytes(*fd).is_some_and(|(_, got)| got > min))
        .collect()
}

fn run_async(pg: &ProcessGroup) -> Result<()> {
    let rank = pg.rank();
    let mut works = Vec::new();
    for id in 0..8usize {
        let len = 10_007 + id;
        let mine = data::values(1000 + id as u64, rank, len, DType::F32, Some(ReduceOp::Sum));
        let mut t = TensorMut::zeros(DType::F32, &[len])?;
        t.bytes_mut()
            .copy_from_slice(&data::to_bytes(DType::F32, &mine));
        works.push((id, pg.allreduce_async(t, ReduceOp::Sum)));
    }
    // Blocking calls after async ones keep the order: this barrier runs after all eight.
    pg.barrier()?;
    for (id, w) in works {
        let t = w.wait()?;
        print_case(id, &data::from_bytes(DType::F32, &t.freeze().into_bytes()));
    }
    Ok(())
}

/// Allreduces forever (until killed); `[len]` elements per call (default 1000: the one-hop path).
fn run_loop(pg: &ProcessGroup, args: &[String]) -> Result<()> {
    let len = match args.first() {
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| Error::invalid("len", format!("not a number: {v}")))?,
        None => 1000,
    };
    let mut buf = vec![1.0f32; len];
    for i in 0..100_000u64 {
        pg.allreduce(&mut buf, ReduceOp::Max)?;
        println!("ITER {i}");
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Stalls the group on purpose. `--how user`: allreduces in a loop, and rank `--culprit` stops
/// calling them after 5 (busy in its own code for a minute). `--how recv-cycle`: ranks 0 and 1
/// each receive from the other (both wait for a send that never comes); other ranks wait in a
/// barrier. Prints `ITER n` as it goes.
fn run_stall(pg: &ProcessGroup, args: &[String]) -> Result<()> {
    let culprit: usize = flag_value(args, "--culprit")
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    match flag_value(args, "--how").as_deref() {
        Some("recv-cycle") => {
            let mut buf = [0.0f32; 4];
            match pg.rank() {
                0 => pg.recv(&mut buf, 1),
                1 => pg.recv(&mut buf, 0),
                _ => pg.barrier(),
            }
        }
        _ => {
            let mut buf = vec![1.0f32; 65536];
            for i in 0..100_000u64 {
                if i == 5 && pg.rank() == culprit {
                    std::thread::sleep(Duration::from_secs(60));
                }
                pg.allreduce(&mut buf, ReduceOp::Max)?;
                println!("ITER {i}");
            }
            Ok(())
        }
    }
}

fn run_mismatch(pg: &ProcessGroup, args: &[String]) -> Result<()> {
    let odd: usize = flag_value(args, "--odd")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if pg.rank() == odd {
        pg.broadcast(&mut [0.0f32; 10], 0)
    } else {
        pg.allreduce(&mut [0.0f32; 12], ReduceOp::Sum)
    }
}

/// `--fail 1,3`: those ranks report a failure ("no luck on rank R"); every rank prints what the
/// group agreed (`AGREE ok` or `AGREE <why>`), then checks the group still works.
fn run_agree(pg: &ProcessGroup, args: &[String]) -> Result<()> {
    let failing: Vec<usize> = flag_value(args, "--fail")
        .unwrap_or_default()
        .split(',')
        .filter_map(|r| r.parse().ok())
        .collect();
    let why = format!("no luck on rank {}", pg.rank());
    let mine = if failing.contains(&pg.rank()) {
        Err(why.as_str())
    } else {
        Ok(())
    };
    match pg.agree(mine)? {
        Ok(()) => println!("AGREE ok"),
        Err(why) => println!("AGREE {why}"),
    }
    let mut one = [1.0f32];
    pg.allreduce(&mut one, ReduceOp::Sum)?;
    println!("AFTER {}", one[0]);
    Ok(())
}

async fn meet(args: &[String]) -> Result<()> {
    let secs: u64 = flag_value(args, "--timeout")
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let deadline = Duration::from_secs(secs);
    let spec = ClusterSpec::from_env()?;
    let token =
        JobToken::from_env()?.ok_or_else(|| Error::config("TANDEM_JOB_TOKEN", "not set"))?;
    let mut host = None;
    let session = if args.iter().any(|a| a == "--host") {
        let h = Host::bind("127.0.0.1:0", ServerConfig::new(token.clone())).await?;
        println!("ADDR {}", h.addr());
        let spec = ClusterSpec::builder()
            .rank(spec.rank())
            .world_size(spec.world_size())
            .rendezvous(h.addr().to_string())
            .build()?;
        host = Some(h);
        Session::join(&spec, &token, None, true, deadline).await?
    } else {
        Session::join(&spec, &token, None, true, deadline).await?
    };
    let (rank, n) = (spec.rank(), spec.world_size());
    let c = &session.client;
    let mine = format!("rank{rank}-pid{}", std::process::id());
    c.set(&format!("value/{rank}"), mine.clone()).await?;
    let keys: Vec<String> = (0..n).map(|r| format!("value/{r}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let values = c.wait(&keys, deadline).await?;
    let values: Vec<String> = values
        .iter()
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    c.add("counter", rank as i64 + 1).await?;
    c.barrier("counted", n, rank, deadline).await?;
    let counter = c
        .get("counter")
        .await?
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    let result =
        serde_json::json!({ "rank": rank, "mine": mine, "values": values, "counter": counter });
    println!("RESULT {result}");
    session.leave(deadline).await?;
    if let Some(h) = host {
        h.stop().await?;
    }
    Ok(())
}

/// 130 small allreduces; rank `--slow R` arrives 10 ms late to each.
fn run_straggle(pg: &ProcessGroup, args: &[String]) -> Result<()> {
    let slow: usize = flag_value(args, "--slow")
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mut buf = vec![1.0f32; 1000];
    for _ in 0..130 {
        if pg.rank() == slow {
            let _s = tandem::timeline::span("late on purpose");
            std::thread::sleep(Duration::from_millis(10));
        }
        pg.allreduce(&mut buf, ReduceOp::Max)?;
    }
    Ok(())
}
