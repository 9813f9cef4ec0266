//! The parameter-server modes: `ps-server`, `ps-worker`, `ps-sparse`, `ps-big`, and malformed
//! pushes sent straight through gRPC.

use std::time::Duration;

use tandem::rendezvous::JobToken;
use tandem::{Error, Result};
use tandem_ps::client::{Client as PsClient, TrainingMode};
use tandem_ps::init::Init;
use tandem_ps::optimizer::Optimizer;
use tandem_ps::placement::{ParamDecl, place, place_split};
use tandem_tests::linreg;

use super::flag_value;

/// A parameter server on an ephemeral port; prints `ADDR host:port`, serves until the workers are done.
/// Flags: [--bind ADDR] [--index I --ckpt DIR --every N] [--lease SECS] (the worker lease)
/// [--follow ADDR] (also serve a standby of the server at ADDR).
pub(crate) async fn ps_server(args: &[String]) -> Result<()> {
    let token =
        JobToken::from_env()?.ok_or_else(|| Error::config("TANDEM_JOB_TOKEN", "not set"))?;
    let bind = flag_value(args, "--bind").unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind(&bind)
        .await
        .map_err(|e| Error::io("bind", e))?;
    let addr = listener.local_addr().map_err(|e| Error::io("addr", e))?;
    println!("ADDR {addr}");
    let mut config = tandem_ps::server::ServerConfig::new(token);
    config.follow = flag_value(args, "--follow").map(|primary| tandem_ps::server::FollowConfig {
        primary,
        bind: "127.0.0.1:0".into(),
    });
    config.worker_lease = flag_value(args, "--lease")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs_f64);
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
/// [--timeout SECS] (the client's deadline, default 30) [--const-grad] (the gradient of step s is
/// `const_grad(s)` whatever the parameters: the result is then known whoever took part in a step)
/// [--stall-at STEP --stall-ms MS] (silent that long between that step's pull and its push);
/// prints `STEP <n>` every 10 steps, and `REWOUND <a> -> <b>` when a sync pull returns an older
/// version than one already seen. A push refused because the worker's lease expired prints
/// `REFUSED <why>` and the worker goes on from the server's step.
pub(crate) async fn ps_worker(args: &[String]) -> Result<()> {
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
    let const_grad = args.iter().any(|a| a == "--const-grad");
    let stall_at = get("--stall-at").and_then(|v| v.parse::<u64>().ok());
    let stall = Duration::from_millis(num("--stall-ms", 0));
    let mut stalled = false;
    let mut seen = 0u64;
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
    // `--max-part BYTES` cuts the weights into partitions of at most that size (whole rows).
    let map = place_split(
        &params,
        servers.len(),
        num("--min-part", 16) as usize,
        num("--max-part", 0) as usize,
    )?;
    // `--overlap`: each push also pulls the next step's parameters at once (push_pull_into).
    let overlap = args.iter().any(|a| a == "--overlap");
    let mut pulled: Option<(u64, std::collections::HashMap<String, Vec<f32>>)> = None;
    let connect = || {
        PsClient::connect(
            &servers,
            &token,
            worker,
            map.clone(),
            opt,
            mode,
            Duration::from_secs(num("--timeout", 30)),
        )
    };
    let mut client = connect().await?;
    // `--restart-at STEP`: before that step, the worker saves its compression state, drops its
    // client and connects anew (as a restarted process would), restoring the state unless
    // `--no-restore`.
    let mut restart_at = get("--restart-at").and_then(|v| v.parse::<u64>().ok());
    let restore = !args.iter().any(|a| a == "--no-restore");
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
        if restart_at == Some(step) {
            restart_at = None;
            let state = client.compression_state();
            drop(client);
            client = connect().await?;
            if restore {
                client.restore_compression_state(&state)?;
            }
            println!("RESTARTED {step} {}", state.len());
        }
        if iterations % 10 == 0 {
            println!("STEP {iterations}");
        }
        let (v, p) = match pulled.take() {
            Some(next) => next,
            None => client.pull(if sync { step } else { 0 }).await?,
        };
        if sync && v < seen {
            // A version seen before is gone (a server restarted from an older checkpoint).
            println!("REWOUND {seen} -> {v}");
        }
        seen = seen.max(v);
        if sync && v >= steps {
            break;
        }
        if sync {
            step = v;
        }
        let (gw, gb) = if const_grad {
            linreg::const_grad(step)
        } else {
            linreg::grad(&p["w"], p["b"][0], &data)
        };
        if !slow.is_zero() {
            tokio::time::sleep(slow).await;
        }
        if stall_at == Some(step) && !stalled {
            // Silent between its pull and its push, as a worker paused or cut off would be.
            stalled = true;
            tokio::time::sleep(stall).await;
        }
        let grads: [(&str, &[f32]); 2] = [("w", &gw), ("b", &[gb])];
        let pushed = if overlap {
            let mut next = std::collections::HashMap::new();
            client
                .push_pull_into(step, &grads, &mut next)
                .await
                .map(|(out, v)| {
                    pulled = Some((v, next));
                    out
                })
        } else {
            client.push(step, &grads).await
        };
        let out = match pushed {
            Err(e @ Error::LeaseExpired { .. }) => {
                println!("REFUSED {e}");
                continue;
            }
            r => r?,
        };
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
    let bytes_in: u64 = client.stats().await?.iter().map(|s| s.bytes_in).sum();
    let result = serde_json::json!({ "w": p["w"], "b": p["b"][0], "version": version, "dropped": dropped, "max_spread": max_spread, "same_host": client.same_host(), "compression": client.compression().to_string(), "bytes_in": bytes_in });
    println!("RESULT {result}");
    client.done().await?;
    Ok(())
}

/// Sparse embedding rows: `--servers a,b --opt sgd|adagrad`. Pulls rows, pushes row gradients twice
/// (with a repeated id), pulls again and prints `RESULT {before, after}`.
pub(crate) async fn ps_sparse(args: &[String]) -> Result<()> {
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
pub(crate) async fn ps_big(args: &[String]) -> Result<()> {
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
        serde_json::json!({ "mismatches": mismatches, "version": version, "elems": n, "same_host": client.same_host(), "compression": client.compression().to_string() })
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
