//! The trials' processes: starting one (its own process group, its output parsed for metrics as
//! it comes), stopping them (the whole group), and recording how each ended.
//!
//! Why a process group per trial: a trial may start processes of its own (a distributed trial
//! starts a launcher, which starts ranks); stopping the trial must stop all of them, and a signal to
//! the group reaches every one.

use super::*;

/// Sends `s` to a trial's process group, if it has one.
pub(super) fn signal(pgid: Option<i32>, s: Signal) {
    if let Some(p) = pgid {
        let _ = killpg(Pid::from_raw(p), s);
    }
}

/// Stops every running trial with `status`, recording `why`.
pub(super) fn stop_all(running: &mut BTreeMap<u64, Running>, status: Status, why: &str) {
    for r in running.values_mut() {
        if r.stop.is_none() {
            r.stop = Some((status, why.to_string()));
        }
        signal(r.pgid, Signal::SIGTERM);
    }
}

/// Waits (bounded) for every running trial to end and records it.
pub(super) fn finish_all(
    e: &Experiment,
    record: &mut Record,
    running: &mut BTreeMap<u64, Running>,
    out: &Path,
    on_change: &mut dyn FnMut(&Record, &Change),
) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(5);
    for (i, mut r) in std::mem::take(running) {
        while r.child.try_wait().ok().flatten().is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        if r.child.try_wait().ok().flatten().is_none() {
            signal(r.pgid, Signal::SIGKILL);
            let _ = r.child.kill();
        }
        if let Ok(s) = r.child.wait() {
            r.exited = Some((s, Instant::now()));
        }
        conclude(e, record, i, r);
        on_change(record, &Change::Ended(i));
    }
    record.save(out)?;
    Ok(())
}

/// Reads the metrics file a trial wrote (Katib's `File` collector), its placeholders filled.
fn read_metrics_file(e: &Experiment, index: u64, path: &str, json: bool, r: &mut Running) {
    let path = path
        .replace("${trialName}", &format!("{}-trial-{index}", e.name))
        .replace("${experimentName}", &e.name);
    let file = match &e.template.working_dir {
        Some(d) if !Path::new(&path).is_absolute() => Path::new(d).join(&path),
        _ => Path::new(&path).to_path_buf(),
    };
    let Ok(text) = std::fs::read_to_string(&file) else {
        return;
    };
    for line in text.lines() {
        let pairs = if json {
            r.parser.parse_json(line)
        } else {
            r.parser.parse(line)
        };
        r.metrics.add_pairs(pairs);
    }
}

/// Ends trial `index`: reaps it, reads its metrics file, records its status, objective and
/// metrics, and returns the status.
pub(super) fn conclude(e: &Experiment, record: &mut Record, index: u64, mut r: Running) -> Status {
    let exit = r.exited.map(|x| x.0).or_else(|| r.child.wait().ok());
    // Whatever the trial left behind in its process group goes too.
    signal(r.pgid, Signal::SIGKILL);
    if let Source::File { path, json } = &e.collector.source {
        read_metrics_file(e, index, path, *json, &mut r);
    }
    let objective = r.metrics.value(&e.objective.metric, e.objective.strategy);
    let (status, reason) = match (r.stop.take(), exit) {
        (Some((s, why)), _) => (s, Some(why)),
        (None, Some(x)) if x.success() => match objective {
            Some(_) => (Status::Succeeded, None),
            None => (
                Status::Failed,
                Some(format!(
                    "exited 0 but reported no {m}; print a line such as `{m}=0.93`",
                    m = e.objective.metric
                )),
            ),
        },
        (None, Some(x)) => (
            Status::Failed,
            Some(match (x.code(), x.signal()) {
                (Some(c), _) => format!(
                    "exited with code {c} (see trials/{}-trial-{index}.log)",
                    e.name
                ),
                (None, Some(s)) => format!("killed by signal {s}"),
                _ => "ended abnormally".into(),
            }),
        ),
        (None, None) => (Status::Failed, Some("could not be waited for".into())),
    };
    if let Some(t) = record.trials.iter_mut().find(|t| t.index == index) {
        t.status = status;
        t.reason = reason;
        t.objective = objective;
        t.seconds = r.started.elapsed().as_secs_f64();
        for m in &e.objective.additional {
            if let Some(v) = r.metrics.value(m, crate::spec::Strategy::Latest) {
                t.metrics.insert(m.clone(), v);
            }
        }
    }
    status
}

/// Starts trial `index` with `params`: its command (placeholders filled, under `tandem launch`
/// for a distributed trial spec) in its own process group, its output read line by line.
pub(super) fn start(
    e: &Experiment,
    index: u64,
    params: Assignment,
    logs: &Path,
    tx: &Sender<Event>,
) -> Result<(Running, Assignment)> {
    let name = format!("{}-trial-{index}", e.name);
    let command: Vec<String> = e
        .template
        .command
        .iter()
        .map(|a| substitute(e, a, &name, &params))
        .collect();
    let args = launched(e, command, |a| substitute(e, a, &name, &params));
    let mut cmd = Command::new(&args[0]);
    cmd.args(&args[1..])
        .env(tandem_core::settings::TRIAL_NAME.name, &name)
        .env(tandem_core::settings::EXPERIMENT.name, &e.name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for (k, v) in &e.template.env {
        cmd.env(k, substitute(e, v, &name, &params));
    }
    if let Some(dir) = &e.template.working_dir {
        cmd.current_dir(dir);
    }
    let log_path = logs.join(format!("{name}.log"));
    let log = File::create(&log_path)
        .map_err(|err| Error::io(format!("creating {}", log_path.display()), err))?;
    let log = Arc::new(Mutex::new(log));
    if let Ok(mut l) = log.lock() {
        let _ = writeln!(l, "$ {}", args.join(" "));
    }
    let mut child = cmd
        .spawn()
        .map_err(|err| Error::io(format!("starting trial {name} ({:?})", args[0]), err))?;
    let pgid = i32::try_from(child.id()).ok();
    if let Some(out) = child.stdout.take() {
        let (tx, log) = (tx.clone(), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
                if let Ok(mut l) = log.lock() {
                    let _ = writeln!(l, "{line}");
                }
                if tx.send(Event::Line(index, line)).is_err() {
                    break;
                }
            }
            let _ = tx.send(Event::Closed(index));
        });
    }
    if let Some(err) = child.stderr.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(|l| l.ok()) {
                if let Ok(mut l) = log.lock() {
                    let _ = writeln!(l, "stderr: {line}");
                }
            }
        });
    }
    Ok((
        Running {
            child,
            pgid,
            started: Instant::now(),
            metrics: Metrics::default(),
            stop: None,
            open: true,
            exited: None,
            parser: LineParser::new(&e.collector)?,
        },
        params,
    ))
}
