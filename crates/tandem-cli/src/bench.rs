//! `tandem bench allreduce|broadcast|allgather|reduce-scatter`: an nccl-tests-style sweep over sizes,
//! run by N local ranks over the TCP ring.
//!
//! Why the nccl-tests format: users compare collectives by bus bandwidth (algbw · 2(n−1)/n for an
//! allreduce), which is what the link carries and so comparable across world sizes and libraries;
//! printing the same columns makes Tandem's figures line up with NCCL's, Gloo's and MPI's. Each
//! rank is its own process (as in a real job), every result is checked against the expected value
//! (`#wrong`), and peak RSS is reported next to the speed.
//!
//! What a run prints (`tandem bench allreduce --np 2 --min 4K --max 16K --iters 50`, a debug
//! build, figures for shape only):
//!
//! ```text
//! # TCP congestion control: cubic (TANDEM_TCP_CONGESTION: cubic where allowed)
//! # connections: mutual TLS
//! # tandem bench allreduce : 2 ranks, backend tcp, op sum, dtype f32
//! #     size(B)        count   type  redop    time(us) algbw(GB/s) busbw(GB/s)  #wrong
//!          4096         1024    f32    sum        60.0       0.068       0.068       0
//!          8192         2048    f32    sum        76.0       0.108       0.108       0
//!         16384         4096    f32    sum       106.4       0.154       0.154       0
//! # peak RSS per rank (MiB): 37.2 37.0
//! ```
//!
//! The columns:
//! - `size(B)`, `count`, `type`, `redop`: the buffer each rank passes, in bytes and elements, its
//!   dtype and the reduce operator;
//! - `time(us)`: the time of one operation, the slowest rank's (an operation is done when every
//!   rank has its result), averaged over the timed iterations;
//! - `algbw`: bytes / time; `busbw`: algbw times the collective's factor (2(n-1)/n for an
//!   allreduce, 1 for a broadcast, (n-1)/n for an allgather or a reduce-scatter), what one link
//!   carries;
//! - `#wrong`: elements that differ from the expected value, summed over the ranks (anything but 0
//!   is a bug, and the figure beside it means nothing);
//! - with simulated hosts and a shaped link, `of link`: busbw as a share of the link's rate.
//!
//! The header says how the ranks' connections were made (mutual TLS, plaintext, or local sockets)
//! and which congestion control they use, because both change the figures. `--csv` appends every
//! row to a file and `--plot` draws busbw against size. `--compression NAME` (allreduce, f32)
//! compresses every operation as a training loop's gradients would be (`fp16`, `bf16`,
//! `topk:FRACTION`, `powersgd:RANK`, one compressor kept across the iterations); the header says
//! which, and `algbw`/`busbw` still count the f32 bytes, so they read as the speed the caller sees.

use crate::ExitCode;
use std::io::Write;
use std::time::Duration;

use clap::Args;
use tandem::{DType, Error, ProcessGroup, ReduceOp, Result};

pub use crate::bench_size::Collective;
use crate::bench_size::{Size, Timed, run_size, run_size_compressed, run_size_device};
use crate::local_job::{parse_size, run_local};
use crate::memory::peak_rss;
use tandem::collective::compression::Compression;

/// Arguments of `tandem bench <collective>`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Number of local ranks.
    #[arg(long, default_value_t = 2)]
    np: usize,
    /// Smallest size in bytes (K, M, G suffixes).
    #[arg(long, default_value = "4K")]
    pub(crate) min: String,
    /// Largest size in bytes.
    #[arg(long, default_value = "64M")]
    pub(crate) max: String,
    /// Reduce operator.
    #[arg(long, default_value = "sum")]
    op: String,
    /// Element type.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Compress the allreduce's gradient on the wire: none, fp16, bf16, topk:FRACTION or
    /// powersgd:RANK (f32 allreduces only; `#wrong` then counts elements off the exact sum for the
    /// half types, and elements that are not finite for top-k and PowerSGD, which change values by
    /// design).
    #[arg(long, default_value = "none")]
    pub(crate) compression: String,
    /// Timed iterations per size (default: fewer for large sizes).
    #[arg(long)]
    pub(crate) iters: Option<usize>,
    /// Untimed iterations per size.
    #[arg(long, default_value_t = 3)]
    pub(crate) warmup: usize,
    /// Also write the table as CSV here.
    #[arg(long)]
    csv: Option<String>,
    /// Also draw busbw against size as a PNG here.
    #[arg(long)]
    plot: Option<String>,
    /// Pipeline segment in bytes (TANDEM_SEGMENT_BYTES).
    #[arg(long)]
    segment: Option<String>,
    /// Connections per pair of ranks (TANDEM_STREAMS_PER_PEER, 1 to 8): large allreduces and
    /// broadcasts are cut into this many parts, each on its own connections and thread.
    #[arg(long)]
    streams_per_peer: Option<usize>,
    /// TCP congestion control of the ranks' connections (TANDEM_TCP_CONGESTION: `system`, or a
    /// name such as `cubic` or `bbr`; default: cubic where the kernel allows it).
    #[arg(long)]
    tcp_congestion: Option<String>,
    /// `tcp`: host buffers over Tandem's TCP ring; `nccl`: GPU buffers through NCCL (builds with the
    /// `nccl` feature; one GPU per rank, chosen by `nvidia-smi topo -m`).
    #[arg(long, default_value = "tcp")]
    backend: String,
    /// Run on this many simulated hosts (network namespaces on this machine; needs root) instead
    /// of one: every byte between hosts crosses a link. `--np` is then hosts x ranks per host.
    #[arg(long)]
    hosts: Option<usize>,
    /// Connections in plaintext (TANDEM_INSECURE=1) instead of mutual TLS, to measure what TLS
    /// costs.
    #[arg(long)]
    insecure: bool,
    /// Ranks on each simulated host.
    #[arg(long, default_value_t = 1)]
    ranks_per_host: usize,
    /// Shape each host's link to this rate (`500mbit`, `2gbit`, `10gbit`) and print the link
    /// bound and the fraction of it reached.
    #[arg(long)]
    link: Option<String>,
    /// Measure what the flight recorder and the metrics cost: every rank alternates batches of
    /// operations with them on and off, and the table shows both times per size (medians of the
    /// batches) and their ratio.
    #[arg(long)]
    observe_cost: bool,
    /// Measure what elastic training costs when nothing fails: the ranks form an elastic group
    /// (tandem::elastic) and alternate batches of allreduces with and without a commit of a
    /// state as large as the tensor after each one; the table shows both times and their ratio.
    #[arg(long, conflicts_with = "observe_cost")]
    pub(crate) elastic_cost: bool,
    /// With `--elastic-cost`: commit after every this many allreduces (1: every one).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub(crate) commit_every: u64,
    /// Bytes per second of each link (set for the ranks by `--link`).
    #[arg(long, hide = true)]
    link_bytes: Option<f64>,
}

/// Arguments of one bench rank (hidden).
#[derive(Args, Debug, Clone)]
pub struct BenchRankArgs {
    /// Which collective.
    #[arg(value_enum)]
    collective: Collective,
    /// The bench's own flags.
    #[command(flatten)]
    bench: BenchArgs,
}

/// What `tandem bench` measures.
#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Ring allreduce over N local ranks.
    Allreduce(BenchArgs),
    /// Pipelined broadcast from rank 0.
    Broadcast(BenchArgs),
    /// Ring allgather.
    Allgather(BenchArgs),
    /// Ring reduce-scatter.
    ReduceScatter(BenchArgs),
    /// The parameter server: W workers and S servers.
    Ps(crate::bench_ps::BenchPsArgs),
}

/// Runs `tandem bench <what>`.
pub fn run(cmd: BenchCommand) -> Result<ExitCode> {
    match cmd {
        BenchCommand::Allreduce(a) => bench(Collective::Allreduce, a),
        BenchCommand::Broadcast(a) => bench(Collective::Broadcast, a),
        BenchCommand::Allgather(a) => bench(Collective::Allgather, a),
        BenchCommand::ReduceScatter(a) => bench(Collective::ReduceScatter, a),
        BenchCommand::Ps(a) => crate::bench_ps::bench_ps(a),
    }
}

/// Checks the congestion control the ranks will use (`--tcp-congestion`, else
/// `TANDEM_TCP_CONGESTION`, else the default) against the kernel, says which it is, and passes the
/// flag's value on to the ranks in `env`.
pub(crate) fn congestion(flag: Option<&str>, env: &mut Vec<(String, String)>) -> Result<()> {
    use tandem::collective::transport::congestion::{CONGESTION_VAR, Congestion};
    let asked = match flag {
        Some(v) => v
            .parse::<Congestion>()
            .map_err(|e| Error::invalid("--tcp-congestion", e.to_string()))?,
        None => Congestion::from_env()?,
    };
    let chosen = asked.resolve()?;
    if let Some(v) = flag {
        env.push((CONGESTION_VAR.to_string(), v.to_string()));
    }
    println!("# TCP congestion control: {chosen} ({CONGESTION_VAR}: {asked})");
    Ok(())
}

/// Starts `np` ranks running the sweep and forwards rank 0's table.
pub fn bench(collective: Collective, args: BenchArgs) -> Result<ExitCode> {
    let hosts = check_job(collective, &args)?;
    let np = hosts.as_ref().map_or(args.np, |h| h.hosts * h.per_host);
    let link = hosts
        .as_ref()
        .and_then(crate::hosts::Hosts::link_bytes_per_s);
    let rank_args = rank_args(collective, &args, np, link);
    let mut env = tuning_env(&args)?;
    congestion(args.tcp_congestion.as_deref(), &mut env)?;
    let transport = crate::hosts::JobTransport::new(args.insecure)?;
    println!("# connections: {}", transport.name());
    let failed = match &hosts {
        Some(h) => {
            let bed = h.testbed()?;
            println!(
                "# {} simulated hosts x {} ranks, links {}",
                h.hosts,
                h.per_host,
                h.link.as_ref().map_or("unshaped", |(_, l)| l.as_str())
            );
            env.extend(transport.env());
            crate::hosts::run_ranks(&bed, h, &rank_args, &env)?
        }
        None => run_local(
            tandem_launch::Layout::Allreduce { nproc: args.np },
            &rank_args,
            None,
            {
                env.extend(transport.env());
                env
            },
            gpus_for(&args)?,
            Duration::from_secs(3600),
            args.elastic_cost.then_some((args.np, args.np)),
            |p, line, stderr| {
                if p.rank == 0 || stderr {
                    println!("{line}");
                }
            },
        )?,
    };
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("tandem bench: {failed}");
        Ok(ExitCode::from(1))
    }
}

/// The ring's tuning asked for by the flags, as the variables the ranks read.
fn tuning_env(args: &BenchArgs) -> Result<Vec<(String, String)>> {
    let mut env = Vec::new();
    if let Some(s) = &args.segment {
        env.push((
            tandem::settings::SEGMENT_BYTES.name.to_string(),
            parse_size("--segment", s)?.to_string(),
        ));
    }
    if let Some(n) = args.streams_per_peer {
        if !(1..=tandem::collective::MAX_STREAMS_PER_PEER).contains(&n) {
            return Err(Error::invalid(
                "--streams-per-peer",
                format!(
                    "expected 1 to {}, got {n}",
                    tandem::collective::MAX_STREAMS_PER_PEER
                ),
            ));
        }
        env.push((tandem::collective::STREAMS_VAR.to_string(), n.to_string()));
        println!("# streams per peer: {n}");
    }
    Ok(env)
}

/// The flags of a collective bench checked together; the simulated hosts they ask for.
fn check_job(collective: Collective, args: &BenchArgs) -> Result<Option<crate::hosts::Hosts>> {
    check_args(args)?;
    if args.compression.parse::<Compression>()?.is_lossy() && collective != Collective::Allreduce {
        return Err(Error::invalid(
            "--compression",
            "compresses allreduces (tandem bench allreduce --compression NAME)",
        ));
    }
    if args.elastic_cost && collective != Collective::Allreduce {
        return Err(Error::invalid(
            "--elastic-cost",
            "is measured on allreduce (tandem bench allreduce --elastic-cost)",
        ));
    }
    let hosts =
        crate::hosts::Hosts::from_flags(args.hosts, args.ranks_per_host, args.link.as_deref())?;
    if hosts.is_some() && args.backend != "tcp" {
        return Err(Error::invalid(
            "--backend",
            "simulated hosts have no GPUs; use tcp",
        ));
    }
    Ok(hosts)
}

/// The flags every bench checks before starting anything.
fn check_args(args: &BenchArgs) -> Result<()> {
    if args.np == 0 || args.np > 64 {
        return Err(Error::invalid(
            "--np",
            format!("{} is not between 1 and 64", args.np),
        ));
    }
    let (min, max) = (
        parse_size("--min", &args.min)?,
        parse_size("--max", &args.max)?,
    );
    if min > max {
        return Err(Error::invalid(
            "--min",
            format!("{min} is larger than --max {max}"),
        ));
    }
    args.op.parse::<ReduceOp>()?;
    args.dtype.parse::<DType>()?;
    let compression: Compression = args.compression.parse()?;
    if compression.is_lossy() && (args.dtype != "f32" || args.backend != "tcp") {
        return Err(Error::invalid(
            "--compression",
            "compresses f32 gradients on the TCP ring: use --dtype f32 and --backend tcp",
        ));
    }
    if args.elastic_cost && (args.hosts.is_some() || args.backend != "tcp") {
        return Err(Error::invalid(
            "--elastic-cost",
            "measures elastic commits between TCP-ring allreduces on this machine; drop --hosts and --backend",
        ));
    }
    Ok(())
}

/// The GPUs of the ranks (none for the TCP backend).
fn gpus_for(args: &BenchArgs) -> Result<Vec<usize>> {
    match args.backend.as_str() {
        "tcp" => Ok(Vec::new()),
        "nccl" => {
            if args.dtype != "f32" {
                return Err(Error::invalid(
                    "--dtype",
                    "the nccl bench measures f32 buffers",
                ));
            }
            tandem_launch::assign_gpus("auto", &tandem_launch::Layout::Allreduce { nproc: args.np })
        }
        other => Err(Error::invalid(
            "--backend",
            format!("{other:?} is not tcp or nccl"),
        )),
    }
}

/// The command line of each rank.
fn rank_args(
    collective: Collective,
    args: &BenchArgs,
    np: usize,
    link: Option<f64>,
) -> Vec<String> {
    let mut r: Vec<String> = vec!["bench-rank".into(), collective.name().into()];
    if let Some(l) = link {
        r.extend(["--link-bytes".into(), l.to_string()]);
    }
    r.extend([
        "--np".into(),
        np.to_string(),
        "--min".into(),
        args.min.clone(),
        "--max".into(),
        args.max.clone(),
        "--backend".into(),
        args.backend.clone(),
        "--op".into(),
        args.op.clone(),
        "--dtype".into(),
        args.dtype.clone(),
        "--compression".into(),
        args.compression.clone(),
        "--warmup".into(),
        args.warmup.to_string(),
    ]);
    if args.observe_cost {
        r.push("--observe-cost".into());
    }
    if args.elastic_cost {
        r.extend([
            "--elastic-cost".into(),
            "--commit-every".into(),
            args.commit_every.to_string(),
        ]);
    }
    for (flag, v) in [
        ("--iters", args.iters.map(|i| i.to_string())),
        ("--csv", args.csv.clone()),
        ("--plot", args.plot.clone()),
    ] {
        if let Some(v) = v {
            r.extend([flag.to_string(), v]);
        }
    }
    r
}

/// The table's header (and the CSV's), on rank 0.
fn print_header(
    collective: Collective,
    a: &BenchArgs,
    n: usize,
    backend: &str,
    op: ReduceOp,
    dtype: DType,
    csv: Option<&mut std::fs::File>,
) {
    if let Ok(c) = a.compression.parse::<Compression>()
        && c.is_lossy()
    {
        println!("# compression: {c}");
    }
    println!(
        "# tandem bench {} : {n} ranks, backend {backend}, op {op}, dtype {dtype}",
        collective.name()
    );
    if let Some(l) = a.link_bytes {
        println!(
            "# link bound: busbw <= {:.3} GB/s (each link's rate; {}); of link = busbw / that",
            l / 1e9,
            bound_note(collective)
        );
    }
    println!(
        "#{:>12} {:>12} {:>6} {:>6} {:>11} {:>11} {:>11} {:>7}{}",
        "size(B)",
        "count",
        "type",
        "redop",
        "time(us)",
        "algbw(GB/s)",
        "busbw(GB/s)",
        "#wrong",
        if a.link_bytes.is_some() {
            "  of link"
        } else {
            ""
        }
    );
    if let Some(f) = csv {
        let _ = writeln!(
            f,
            "collective,ranks,size,count,type,redop,time_us,algbw_gbs,busbw_gbs,wrong"
        );
    }
}

/// What the link bound means for `collective`.
fn bound_note(collective: Collective) -> &'static str {
    match collective {
        Collective::Allreduce => "an allreduce of S bytes moves 2(n-1)/n x S over each link",
        Collective::Broadcast => "a pipelined broadcast moves S over each link",
        Collective::Allgather | Collective::ReduceScatter => "(n-1)/n x S over each link",
    }
}

/// One size of the sweep, as every rank agreed on it.
struct Row {
    /// Bytes per operation.
    bytes: usize,
    /// Seconds per operation (the slowest rank's).
    secs: f64,
    /// Elements found wrong, on every rank together.
    wrong: u64,
}

impl Row {
    /// Prints the row (and writes it to the CSV); returns its bus bandwidth.
    fn report(
        &self,
        collective: Collective,
        a: &BenchArgs,
        n: usize,
        dtype: DType,
        op: ReduceOp,
        csv: Option<&mut std::fs::File>,
    ) -> f64 {
        let (bytes, secs, wrong) = (self.bytes, self.secs, self.wrong);
        let count = bytes / dtype.size();
        let algbw = bytes as f64 / secs / 1e9;
        let busbw = algbw * collective.bus_factor(n);
        let of_link = a
            .link_bytes
            .map(|l| format!("  {:>6.1}%", busbw * 1e9 / l * 100.0))
            .unwrap_or_default();
        println!(
            "{:>13} {:>12} {:>6} {:>6} {:>11.1} {:>11.3} {:>11.3} {:>7}{of_link}",
            bytes,
            count,
            dtype.name(),
            op.name(),
            secs * 1e6,
            algbw,
            busbw,
            wrong
        );
        if let Some(f) = csv {
            let _ = writeln!(
                f,
                "{},{n},{bytes},{count},{dtype},{op},{:.3},{algbw:.4},{busbw:.4},{wrong}",
                collective.name(),
                secs * 1e6,
            );
        }
        busbw
    }
}

/// One rank of the sweep.
pub fn bench_rank(args: BenchRankArgs) -> Result<ExitCode> {
    let collective = args.collective;
    let a = args.bench;
    if a.elastic_cost {
        crate::bench_cost::elastic_cost(collective, &a)?;
        return Ok(ExitCode::SUCCESS);
    }
    let pg = ProcessGroup::from_env()?;
    let (rank, n) = (pg.rank(), pg.world_size());
    let op: ReduceOp = a.op.parse()?;
    let dtype: DType = a.dtype.parse()?;
    let gpu = match a.backend.as_str() {
        "nccl" => Some(tandem::collective::device::DeviceGroup::new(&pg, 0)?),
        _ => None,
    };
    let (min, max) = (
        parse_size("--min", &a.min)?.max(dtype.size()),
        parse_size("--max", &a.max)?,
    );
    let mut csv = match (&a.csv, rank) {
        (Some(path), 0) => Some(
            std::fs::File::create(path).map_err(|e| Error::io(format!("creating {path}"), e))?,
        ),
        _ => None,
    };
    if a.observe_cost {
        if gpu.is_some() {
            return Err(Error::invalid(
                "--observe-cost",
                "measures the TCP ring's recorder and metrics; drop --backend nccl",
            ));
        }
        crate::bench_cost::observe_cost(&pg, collective, dtype, op, min, max, &a)?;
        pg.shutdown()?;
        return Ok(ExitCode::SUCCESS);
    }
    let compression = resolved(&pg, gpu.is_some(), a.compression.parse()?)?;
    if rank == 0 {
        let backend = gpu.as_ref().map_or(pg.backend_name(), |g| g.backend_name());
        print_header(collective, &a, n, backend, op, dtype, csv.as_mut());
    }
    let mut points = Vec::new();
    let mut size = min;
    while size <= max {
        let bytes = (size / dtype.size()) * dtype.size();
        let one = Size {
            op,
            bytes,
            iters: a.iters,
            warmup: a.warmup,
        };
        let timed = match &gpu {
            Some(g) => run_size_device(g, collective, one)?,
            None if compression.is_lossy() => run_size_compressed(&pg, compression, one)?,
            None => run_size(&pg, collective, dtype, one)?,
        };
        let row = agreed(&pg, bytes, timed)?;
        if rank == 0 {
            points.push((
                bytes,
                row.report(collective, &a, n, dtype, op, csv.as_mut()),
            ));
        }
        size *= 2;
    }
    if let (Some(path), 0) = (&a.plot, rank) {
        let title = format!("{} {n} ranks {dtype} {op}", collective.name());
        crate::plot::busbw_png(path, &title, &points)?;
        println!("# plot written to {path}");
    }
    print_peak_rss(&pg)?;
    pg.shutdown()?;
    Ok(ExitCode::SUCCESS)
}

/// Rank 0 prints every rank's peak resident memory.
fn print_peak_rss(pg: &ProcessGroup) -> Result<()> {
    let mut rss = vec![0.0f64; pg.world_size()];
    pg.allgather(&[peak_rss() as f64], &mut rss)?;
    if pg.rank() == 0 {
        let mib: Vec<String> = rss
            .iter()
            .map(|b| format!("{:.1}", b / (1 << 20) as f64))
            .collect();
        println!("# peak RSS per rank (MiB): {}", mib.join(" "));
    }
    Ok(())
}

/// One size's row as every rank agrees on it: the slowest rank's time is the operation's time,
/// the wrong counts add up.
fn agreed(pg: &ProcessGroup, bytes: usize, (wrong, elapsed, iters): Timed) -> Result<Row> {
    let mut stats = [elapsed.as_secs_f64() / iters as f64, wrong as f64];
    pg.allreduce(&mut stats[..1], ReduceOp::Max)?;
    pg.allreduce(&mut stats[1..], ReduceOp::Sum)?;
    Ok(Row {
        bytes,
        secs: stats[0],
        wrong: stats[1] as u64,
    })
}

/// `compression` as the ranks run it: `auto` measures the links now (every rank together, rank 0
/// saying what it chose and why) and is timed as its choice; GPU buffers take it as it is.
fn resolved(pg: &ProcessGroup, on_gpu: bool, compression: Compression) -> Result<Compression> {
    if on_gpu {
        return Ok(compression);
    }
    let chosen = pg.resolve_compression(compression)?;
    if pg.rank() == 0 && compression == Compression::Auto {
        let why = pg.auto_compression()?.reason();
        eprintln!("auto compression chose {chosen}: {why}");
    }
    Ok(chosen)
}
