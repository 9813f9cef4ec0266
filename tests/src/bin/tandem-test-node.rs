//! Helper binary for the multi-process tests: one rank of a job, driven by its environment.
//!
//! Modes:
//! - `meet [--host] [--timeout SECS]`: joins the rendezvous, publishes a value, reads everyone's,
//!   counts, passes a barrier and prints `RESULT {json}`. With `--host` it hosts the rendezvous on an
//!   ephemeral port and prints `ADDR host:port` first.
//! - `suite`: forms a process group and runs every case of `tandem_tests::suite`, printing
//!   `CASE id [values]` for each.
//! - `async`: eight async allreduces in flight, then `CASE id [values]` for each.
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
use tandem_ps::client::{Client as PsClient, TrainingMode};
use tandem_ps::init::Init;
use tandem_ps::optimizer::Optimizer;
use tandem_ps::placement::{ParamDecl, place};
use tandem_tests::{data, linreg, suite};

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
        Some("loop") => collective(|pg| run_loop(pg, &args[1..])),
        Some("straggle") => collective(|pg| run_straggle(pg, &args[1..])),
        Some("mismatch") => collective(|pg| run_mismatch(pg, &args[1..])),
        Some("stall") => collective(|pg| run_stall(pg, &args[1..])),
        Some("agree") => collective(|pg| run_agree(pg, &args[1..])),
        Some("elastic") => run_elastic(&args[1..]),
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
    println!("BIG {bad32} {bad64}");
    Ok(())
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

/// A parameter server on an ephemeral port; prints `ADDR host:port`, serves until the workers are done.
/// Flags: [--bind ADDR] [--index I --ckpt DIR --every N].
async fn ps_server(args: &[String]) -> Result<()> {
    let token =
        JobToken::from_env()?.ok_or_else(|| Error::config("TANDEM_JOB_TOKEN", "not set"))?;
    let bind = flag_value(args, "--bind").unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind(&bind)
        .await
        .map_err(|e| Error::io("bind", e))?;
    let addr = listener.local_addr().map_err(|e| Error::io("addr", e))?;
    println!("ADDR {addr}");
    let mut config = tandem_ps::server::ServerConfig::new(token);
    if let Some(dir) = flag_value(args, "--ckpt") {
        config.checkpoint = Some(tandem_ps::server::CheckpointPolicy {
            dir: dir.into(),
            index: flag_value(args, "--index")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            every: flag_value(args, "--every")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        });
    }
    tandem_ps::server::run(
        listener,
        config,
        tokio::time::sleep(Duration::from_secs(120)),
    )
    .await?;
    println!("SERVER DONE");
    Ok(())
}

/// A linear-regression worker. Flags: --servers a,b --worker W --workers N --mode sync|async
/// [--k K] [--staleness S] [--steps T] [--lr LR] [--opt sgd|adam] [--slow MS] [--bad nan|shape|name]
/// [--timeout SECS] (the client's deadline, default 30); prints `STEP <n>` every 10 steps.
async fn ps_worker(args: &[String]) -> Result<()> {
    let get = |f: &str| flag_value(args, f);
    let num = |f: &str, d: u64| get(f).and_then(|v| v.parse::<u64>().ok()).unwrap_or(d);
    let servers: Vec<String> = get("--servers")
        .unwrap_or_default()
        .split(',')
        .map(str::to_string)
        .collect();
    let worker = num("--worker", 0) as u32;
    let workers = num("--workers", 1) as u32;
    let steps = num("--steps", 100);
    let lr: f32 = get("--lr").and_then(|v| v.parse().ok()).unwrap_or(0.05);
    let slow = Duration::from_millis(num("--slow", 0));
    let sync = get("--mode").as_deref() != Some("async");
    let mut mode = if sync {
        TrainingMode::sync(workers)
    } else {
        TrainingMode::asynchronous(workers, get("--staleness").and_then(|v| v.parse().ok()))
    };
    mode.replicas_to_aggregate = num("--k", workers as u64) as u32;
    let opt = match get("--opt").as_deref() {
        Some("adam") => Optimizer::adam(lr),
        _ => Optimizer::sgd(lr),
    };
    let token =
        JobToken::from_env()?.ok_or_else(|| Error::config("TANDEM_JOB_TOKEN", "not set"))?;
    // 16-byte partitions so the weights are split across the servers (`--min-part` larger keeps
    // them on fewer servers than there are).
    let params = vec![
        ParamDecl::new("w", &[linreg::DIM, 1], Init::Zeros),
        ParamDecl::new("b", &[1], Init::Zeros),
    ];
    let map = place(&params, servers.len(), num("--min-part", 16) as usize)?;
    let client = PsClient::connect(
        &servers,
        &token,
        worker,
        map,
        opt,
        mode,
        Duration::from_secs(num("--timeout", 30)),
    )
    .await?;
    let data = linreg::shard(worker as usize);
    if get("--bad").as_deref() == Some("listed-again") {
        // One async push of the bias gradient 0.25, sent twice with the same id (as after a lost
        // connection): the server must apply it once.
        let (_, before) = client.pull(0).await?;
        for _ in 0..2 {
            raw_push(&servers, &token, "listed-again").await?;
        }
        let (_, after) = client.pull(0).await?;
        let delta = before["b"][0] - after["b"][0];
        let once = (delta - lr * 0.25).abs() <= 1e-6;
        println!("AGAIN delta {delta} once {once}");
        client.done().await?;
        return Ok(());
    }
    if let Some(bad) = get("--bad") {
        let (_, p) = client.pull(0).await?;
        let e = match bad.as_str() {
            "nan" => client
                .push(0, &[("w", &[f32::NAN; linreg::DIM]), ("b", &[0.0])])
                .await
                .err(),
            "shape" => client.push(0, &[("w", &[0.0; 3])]).await.err(),
            "truncated" | "oversized" | "listed-truncated" | "listed-oversized"
            | "listed-twice" | "listed-nan" => raw_push(&servers, &token, &bad).await.err(),
            "shared-len" | "shared-left" | "shared-stranger" => {
                raw_shared_push(&servers, &token, &bad).await.err()
            }
            _ => client.push(0, &[("nope", &[0.0])]).await.err(),
        };
        let (_, after) = client.pull(0).await?;
        let unchanged = p == after;
        println!(
            "BAD {} | unchanged {unchanged}",
            e.map(|e| e.to_string())
                .unwrap_or_else(|| "accepted".into())
        );
        client.done().await?;
        return Ok(());
    }
    let mut step = 0u64;
    let mut dropped = 0u64;
    let mut max_spread = 0u64;
    let mut iterations = 0;
    // Sync workers stop at the global step (backup workers skip steps); async ones count their pushes.
    while if sync {
        step < steps
    } else {
        iterations < steps
    } {
        iterations += 1;
        if iterations % 10 == 0 {
            println!("STEP {iterations}");
        }
        let (v, p) = client.pull(if sync { step } else { 0 }).await?;
        if sync && v >= steps {
            break;
        }
        if sync {
            step = v;
        }
        let (gw, gb) = linreg::grad(&p["w"], p["b"][0], &data);
        if !slow.is_zero() {
            tokio::time::sleep(slow).await;
        }
        let out = client.push(step, &[("w", &gw), ("b", &[gb])]).await?;
        println!("STEP {step}");
        dropped += u64::from(out.dropped);
        if sync {
            step += 1;
        } else {
            step += 1;
            let stats = client.stats().await?;
            for s in stats {
                let (mx, mn) = (
                    s.worker_steps.iter().max().copied().unwrap_or(0),
                    s.worker_steps.iter().min().copied().unwrap_or(0),
                );
                max_spread = max_spread.max(mx - mn);
            }
        }
    }
    if args.iter().any(|a| a == "--checkpoint") {
        let written = client.checkpoint().await?;
        println!("CHECKPOINT {written:?}");
    }
    // Sync: the last step completes once enough workers pushed it, backups or not.
    let (version, p) = client.pull(if sync { steps } else { 0 }).await?;
    let result = serde_json::json!({ "w": p["w"], "b": p["b"][0], "version": version, "dropped": dropped, "max_spread": max_spread, "same_host": client.same_host() });
    println!("RESULT {result}");
    client.done().await?;
    Ok(())
}

/// Sparse embedding rows: `--servers a,b --opt sgd|adagrad`. Pulls rows, pushes row gradients twice
/// (with a repeated id), pulls again and prints `RESULT {before, after}`.
async fn ps_sparse(args: &[String]) -> Result<()> {
    let servers: Vec<String> = flag_value(args, "--servers")
        .unwrap_or_default()
        .split(',')
        .map(str::to_string)
        .collect();
    let opt = match flag_value(args, "--opt").as_deref() {
        Some("adagrad") => Optimizer::adagrad(0.5),
        _ => Optimizer::sgd(0.5),
    };
    let token =
        JobToken::from_env()?.ok_or_else(|| Error::config("TANDEM_JOB_TOKEN", "not set"))?;
    let table = ParamDecl::new(
        "emb",
        &[1000, 8],
        Init::Uniform {
            low: -1.0,
            high: 1.0,
            seed: 5,
        },
    );
    let map = place(&[table], servers.len(), 16)?;
    let client = PsClient::connect(
        &servers,
        &token,
        0,
        map,
        opt,
        TrainingMode::asynchronous(1, None),
        Duration::from_secs(30),
    )
    .await?;
    let ids = [3u64, 999, 500, 4];
    let before = client.pull_rows("emb", &ids).await?;
    let g1: Vec<f32> = (0..24).map(|i| (i as f32 - 12.0) / 8.0).collect();
    client.push_rows("emb", &[3, 500, 3], &g1).await?;
    let g2: Vec<f32> = (0..16).map(|i| i as f32 / 16.0).collect();
    client.push_rows("emb", &[999, 3], &g2).await?;
    let after = client.pull_rows("emb", &ids).await?;
    let bad = client
        .pull_rows("emb", &[1000])
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    println!(
        "RESULT {}",
        serde_json::json!({ "before": before, "after": after, "bad": bad })
    );
    client.done().await?;
    Ok(())
}

/// One big parameter (`--elems N` f32) through one sync step (or one async update with `--mode
/// async`): `RESULT {mismatches}`.
async fn ps_big(args: &[String]) -> Result<()> {
    let servers: Vec<String> = flag_value(args, "--servers")
        .unwrap_or_default()
        .split(',')
        .map(str::to_string)
        .collect();
    let n: usize = flag_value(args, "--elems")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 20);
    let token =
        JobToken::from_env()?.ok_or_else(|| Error::config("TANDEM_JOB_TOKEN", "not set"))?;
    let map = place(
        &[ParamDecl::new("big", &[n], Init::Constant(1.0))],
        servers.len(),
        1 << 20,
    )?;
    let client = PsClient::connect(
        &servers,
        &token,
        0,
        map,
        Optimizer::sgd(1.0),
        if flag_value(args, "--mode").as_deref() == Some("async") {
            TrainingMode::asynchronous(1, None)
        } else {
            TrainingMode::sync(1)
        },
        Duration::from_secs(120),
    )
    .await?;
    let (_, p) = client.pull(0).await?;
    let mut mismatches = p["big"].iter().filter(|v| **v != 1.0).count();
    let grad: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.25).collect();
    drop(p);
    client.push(0, &[("big", &grad)]).await?;
    let (version, p) = client.pull(1).await?;
    mismatches += p["big"]
        .iter()
        .zip(&grad)
        .filter(|(v, g)| **v != 1.0 - **g)
        .count();
    println!(
        "RESULT {}",
        serde_json::json!({ "mismatches": mismatches, "version": version, "elems": n, "same_host": client.same_host() })
    );
    client.done().await?;
    Ok(())
}

type RawClient = tandem_ps::pb::parameter_server_client::ParameterServerClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        tandem::rendezvous::AttachToken,
    >,
>;

/// A bare gRPC client of the server at `addr`, carrying the job token (no checks of its own).
async fn raw_client(addr: &str, token: &JobToken) -> Result<RawClient> {
    let connector = tandem_tls::grpc::Connector::new(tandem_tls::Security::from_env()?);
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Error::invalid("addr", e.to_string()))?
        .connect_with_connector(connector)
        .await
        .map_err(|e| Error::transport("connect", e.to_string()))?;
    let header = format!("Bearer {}", token.as_str())
        .parse()
        .map_err(|_| Error::invalid("token", "bad"))?;
    Ok(
        tandem_ps::pb::parameter_server_client::ParameterServerClient::with_interceptor(
            ch,
            tandem::rendezvous::AttachToken::from_token(header),
        ),
    )
}

/// Pushes a malformed stream straight through gRPC: the bias partition (one f32) with 2 bytes
/// (truncated) or 8 bytes (oversized), received whole by the server; the `listed-` kinds list
/// their partitions first, so the server applies them as it reads them: the same two, the bias
/// partition listed twice, and a NaN the client did not declare (as a client that skipped its
/// own check would send). Returns the server's refusal as an error.
async fn raw_push(servers: &[String], token: &JobToken, kind: &str) -> Result<()> {
    use tandem_ps::pb;
    let mut last = Ok(());
    let listed = kind.starts_with("listed-");
    for addr in servers {
        let mut c = raw_client(addr, token).await?;
        let data: Vec<u8> = match kind {
            "oversized" | "listed-oversized" => vec![0u8; 8],
            "listed-nan" => f32::NAN.to_le_bytes().to_vec(),
            "listed-twice" | "listed-again" => 0.25f32.to_le_bytes().to_vec(),
            _ => vec![0u8; 2],
        };
        let b = || pb::PartRef {
            param: "b".into(),
            part: 0,
        };
        let mut chunks = Vec::new();
        if listed {
            chunks.push(pb::PushChunk {
                worker: 0,
                step: 0,
                parts: if kind == "listed-twice" {
                    vec![b(), b()]
                } else {
                    vec![b()]
                },
                push_id: if kind == "listed-again" { 77 } else { 0 },
                ..Default::default()
            });
        }
        chunks.push(pb::PushChunk {
            worker: 0,
            step: 0,
            param: "b".into(),
            part: 0,
            offset: 0,
            data: data.into(),
            ..Default::default()
        });
        match c.push(tokio_stream::iter(chunks)).await {
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => last = Err(Error::invalid("push", s.message().to_string())),
            Ok(_) => last = Ok(()),
        }
    }
    last
}

/// Pushes the bias gradient by address, wrongly: `shared-len` offers 2 of its 4 bytes,
/// `shared-left` names a word that does not hold the tag (as if the worker had left the push), and
/// `shared-stranger` names a process that never attached (this one's parent: the server must not
/// read a process just because a request names it). Returns the server's refusal as an error.
async fn raw_shared_push(servers: &[String], token: &JobToken, kind: &str) -> Result<()> {
    use tandem::collective::transport::peer_memory::LocalWord;
    use tandem_ps::pb;
    let word = LocalWord::new();
    let grad = [0.5f32];
    let mut last = Ok(());
    for addr in servers {
        let mut c = raw_client(addr, token).await?;
        if kind != "shared-stranger" {
            let r = c
                .attach(pb::AttachRequest {
                    advert: word.advert(),
                })
                .await
                .map_err(|s| Error::transport("attach", s.message().to_string()))?
                .into_inner();
            if !r.ok {
                return Err(Error::transport("attach", r.reason));
            }
        }
        let req = pb::SharedPush {
            worker: 0,
            step: 0,
            pid: if kind == "shared-stranger" {
                std::os::unix::process::parent_id()
            } else {
                std::process::id()
            },
            word: word.address() as u64,
            tag: if kind == "shared-left" {
                word.nonce() ^ 1
            } else {
                word.nonce()
            },
            parts: vec![pb::Region {
                param: "b".into(),
                part: 0,
                addr: grad.as_ptr() as usize as u64,
                len: if kind == "shared-len" { 2 } else { 4 },
            }],
        };
        match c.push_shared(req).await {
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => last = Err(Error::invalid("push", s.message().to_string())),
            Ok(_) => last = Ok(()),
        }
    }
    last
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

/// An elastic job (tandem-elastic): `--steps N` steps of w += allreduce(g), g a small-integer
/// function of (id, step) so every sum is exact. Prints `EPOCH e RANK r WORLD n` at each
/// (re-)formation, `APPLIED step MEMBERS id,id,..` when a step's allreduce succeeded here, and
/// `RESULT {"w": [...], "steps": n}` at the end.
fn run_elastic(args: &[String]) -> Result<()> {
    use tandem_elastic::{Elastic, ElasticConfig, State};
    let steps: u64 = flag_value(args, "--steps")
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let len: usize = flag_value(args, "--len")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let pause = Duration::from_millis(
        flag_value(args, "--pause-ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(20),
    );
    let mut elastic = Elastic::from_env(ElasticConfig::from_env()?)?;
    let id = elastic.id() as usize;
    let mut state = State::new()
        .with_array("w", vec![0.0; len])
        .with_scalar("step", 0.0);
    elastic.run(
        &mut state,
        |ctx| {
            println!(
                "EPOCH {} RANK {} WORLD {}",
                ctx.epoch(),
                ctx.rank(),
                ctx.world_size()
            )
        },
        |ctx, s| loop {
            let step = s.scalar("step").unwrap_or(0.0) as u64;
            if step >= steps {
                return Ok(());
            }
            let mut g: Vec<f32> = (0..len)
                .map(|i| ((i * 7 + id * 13 + step as usize * 3) % 11) as f32 - 5.0)
                .collect();
            ctx.group().allreduce(&mut g, ReduceOp::Sum)?;
            if let Some(w) = s.array_mut("w") {
                for (w, g) in w.iter_mut().zip(&g) {
                    *w += g;
                }
            }
            s.set_scalar("step", (step + 1) as f64);
            let members: Vec<String> = ctx.members().iter().map(u64::to_string).collect();
            println!("APPLIED {} MEMBERS {}", step + 1, members.join(","));
            ctx.commit(s)?;
            std::thread::sleep(pause);
        },
    )?;
    let w: Vec<f64> = state
        .array("w")
        .unwrap_or_default()
        .iter()
        .map(|v| f64::from(*v))
        .collect();
    println!(
        "RESULT {}",
        serde_json::json!({"w": w, "steps": state.scalar("step")})
    );
    Ok(())
}
