//! The timeline: with `TANDEM_TIMELINE=DIR`, every operation of this process and every span the
//! user marks go to `DIR/<role>-<index>.json` (`rank-2.json`) in Chrome's trace event format,
//! which Perfetto (ui.perfetto.dev) and `chrome://tracing` load.
//!
//! Events are buffered and written at least once a second and when the process's group or client
//! closes ([`flush`]); after every write the file is complete JSON, so a process that dies leaves a
//! readable timeline of everything up to its last second. `tandem trace DIR` merges the files of
//! every rank into one trace, a track per rank.
//!
//! Mark a region of your own code with [`span`]:
//! ```
//! {
//!     let _s = tandem_observe::timeline::span("forward");
//!     // ... the region ...
//! } // the span ends here
//! ```

use std::cell::Cell;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::Identity;

/// The track of collectives.
pub const TID_COLLECTIVE: u32 = 1;
/// The track of parameter-server calls.
pub const TID_PS: u32 = 2;

/// What closes the file's JSON after the last event (rewritten after each write).
const TAIL: &[u8] = b"\n]}\n";
/// Buffered events written when they reach this many bytes...
const FLUSH_BYTES: usize = 1 << 20;
/// ...or this long after the last write.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// The timeline file and the events not written yet.
struct Writer {
    path: PathBuf,
    file: File,
    pid: usize,
    buf: Vec<u8>,
    /// Events written to the file so far (the next needs a comma).
    written: bool,
    last_flush: Instant,
}

/// Whether a timeline is being written.
static ON: AtomicBool = AtomicBool::new(false);
/// The process's timeline, once started.
static WRITER: Mutex<Option<Writer>> = Mutex::new(None);

/// Whether a timeline is being written.
#[inline]
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Starts the timeline of `id` in `dir` (made if missing).
pub fn start(dir: &Path, id: &Identity) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{}.json", id.stem()));
    let mut file = File::create(&path)?;
    file.write_all(b"{\"displayTimeUnit\":\"ms\",\"traceEvents\":[")?;
    file.write_all(TAIL)?;
    let mut w = Writer {
        path: path.clone(),
        file,
        pid: id.index,
        buf: Vec::new(),
        written: false,
        last_flush: Instant::now(),
    };
    w.push(&process_name(id));
    w.push(&json!({"name":"tandem_identity","ph":"M","pid":id.index,"tid":0,"args":id}));
    w.push(&json!({"name":"process_sort_index","ph":"M","pid":id.index,"tid":0,"args":{"sort_index":id.index}}));
    for (tid, name) in [
        (TID_COLLECTIVE, "collectives"),
        (TID_PS, "parameter server"),
    ] {
        w.push(
            &json!({"name":"thread_name","ph":"M","pid":id.index,"tid":tid,"args":{"name":name}}),
        );
    }
    w.flush()?;
    let mut slot = WRITER
        .lock()
        .map_err(|_| std::io::Error::other("the timeline's lock was poisoned"))?;
    *slot = Some(w);
    ON.store(true, Ordering::Relaxed);
    tracing::info!("timeline: {}", path.display());
    Ok(path)
}

/// The metadata event naming the process's track.
fn process_name(id: &Identity) -> Value {
    let name = if id.addr.is_empty() {
        format!("{} {}", id.role, id.index)
    } else {
        format!("{} {} ({})", id.role, id.index, id.addr)
    };
    json!({"name":"process_name","ph":"M","pid":id.index,"tid":0,"args":{"name":name}})
}

/// Names the process again (its address became known), with its identity.
pub(crate) fn name_process(id: &Identity) {
    event(process_name(id));
    event(json!({"name":"tandem_identity","ph":"M","tid":0,"args":id}));
}

impl Writer {
    /// Buffers one event.
    fn push(&mut self, event: &Value) {
        if self.written || !self.buf.is_empty() {
            self.buf.extend_from_slice(b",\n");
        } else {
            self.buf.push(b'\n');
        }
        // Writing a Value into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.buf, event);
    }

    /// Writes the buffered events before the closing brackets, which are written again after them.
    fn flush(&mut self) -> std::io::Result<()> {
        self.last_flush = Instant::now();
        if self.buf.is_empty() {
            return Ok(());
        }
        let end = self.file.seek(SeekFrom::End(0))?;
        let at = end.saturating_sub(TAIL.len() as u64);
        self.file.set_len(at)?;
        self.file.seek(SeekFrom::Start(at))?;
        self.file.write_all(&self.buf)?;
        self.file.write_all(TAIL)?;
        self.buf.clear();
        self.written = true;
        Ok(())
    }
}

/// Adds one event (a Chrome trace event object; `pid` is filled in). Written within a second.
pub fn event(mut ev: Value) {
    if !enabled() {
        return;
    }
    let Ok(mut slot) = WRITER.lock() else {
        return;
    };
    let Some(w) = slot.as_mut() else {
        return;
    };
    if let Some(o) = ev.as_object_mut() {
        o.insert("pid".into(), json!(w.pid));
    }
    w.push(&ev);
    if (w.buf.len() >= FLUSH_BYTES || w.last_flush.elapsed() >= FLUSH_EVERY)
        && let Err(e) = w.flush()
    {
        tracing::warn!("timeline {} not written: {e}", w.path.display());
    }
}

/// A complete event: `name` on track `tid` from `start_us` for `dur_us`, with `args`.
pub fn complete(name: &str, cat: &str, tid: u32, start_us: u64, dur_us: u64, args: Value) {
    event(json!({
        "name": name, "cat": cat, "ph": "X", "tid": tid,
        "ts": start_us, "dur": dur_us, "args": args,
    }));
}

/// Writes what is buffered.
pub fn flush() {
    if !enabled() {
        return;
    }
    if let Ok(mut slot) = WRITER.lock()
        && let Some(w) = slot.as_mut()
        && let Err(e) = w.flush()
    {
        tracing::warn!("timeline {} not written: {e}", w.path.display());
    }
}

/// A region of the user's code on the timeline, from [`span`] until dropped.
#[derive(Debug)]
#[must_use = "a span ends when dropped: bind it (`let _s = span(..)`)"]
pub struct Span {
    name: String,
    start_us: u64,
    tid: u32,
}

/// The next user track's id (user tracks start at 100, after Tandem's own).
static NEXT_TID: AtomicU32 = AtomicU32::new(100);
thread_local! {
    /// This thread's user track (0: none yet).
    static TID: Cell<u32> = const { Cell::new(0) };
}

/// This thread's track for user spans (one per thread, so spans nest as the code does).
fn user_tid() -> u32 {
    TID.with(|t| {
        if t.get() == 0 {
            let id = NEXT_TID.fetch_add(1, Ordering::Relaxed);
            t.set(id);
            let name = std::thread::current()
                .name()
                .map(str::to_string)
                .unwrap_or_else(|| format!("thread {id}"));
            event(json!({"name":"thread_name","ph":"M","tid":id,"args":{"name":format!("user: {name}")}}));
        }
        t.get()
    })
}

/// Marks a region named `name` of the calling thread's code, until the returned [`Span`] is
/// dropped. Costs nothing without a timeline.
pub fn span(name: &str) -> Span {
    let (name, tid) = if enabled() {
        (name.to_string(), user_tid())
    } else {
        (String::new(), 0)
    };
    Span {
        name,
        start_us: crate::now_us(),
        tid,
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if self.tid == 0 || !enabled() {
            return;
        }
        let now = crate::now_us();
        complete(
            &self.name,
            "user",
            self.tid,
            self.start_us,
            now.saturating_sub(self.start_us),
            json!({}),
        );
    }
}

/// Writes a span of user code that ran from `start_us` for `dur_us` on the calling thread's track
/// (for bindings that time the span themselves, such as Python's `tandem.span`).
pub fn user_span(name: &str, start_us: u64, dur_us: u64) {
    if !enabled() {
        return;
    }
    let tid = user_tid();
    complete(name, "user", tid, start_us, dur_us, json!({}));
}

/// Reads a timeline file: its events. A file cut short (no closing brackets) is read up to its last
/// whole event.
pub fn read(path: &Path) -> Result<Vec<Value>, crate::ReadError> {
    use crate::ReadError;
    let text = std::fs::read_to_string(path).map_err(|source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let not_a = |detail: String| ReadError::NotA {
        path: path.to_path_buf(),
        what: "timeline (Chrome trace JSON)",
        detail,
    };
    let parsed: Result<Value, _> = serde_json::from_str(&text);
    let v = match parsed {
        Ok(v) => v,
        Err(first) => {
            // Cut short: keep whole events.
            let cut = text.rfind("},\n").map(|i| &text[..=i]).unwrap_or("");
            serde_json::from_str(&format!("{cut}]}}")).map_err(|_| not_a(first.to_string()))?
        }
    };
    match v.get("traceEvents").and_then(Value::as_array) {
        Some(evs) => Ok(evs.clone()),
        None => match v.as_array() {
            Some(evs) => Ok(evs.clone()),
            None => Err(not_a("it has no traceEvents".into())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_json_after_every_flush_and_a_cut_file_is_read_to_its_last_event() {
        let dir = std::env::temp_dir().join(format!("tandem-tl-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.json");
        let mut file = File::create(&path).unwrap();
        file.write_all(b"{\"traceEvents\":[").unwrap();
        file.write_all(TAIL).unwrap();
        let mut w = Writer {
            path: path.clone(),
            file,
            pid: 0,
            buf: Vec::new(),
            written: false,
            last_flush: Instant::now(),
        };
        w.push(&json!({"name":"a","ph":"X","ts":1,"dur":2}));
        w.flush().unwrap();
        assert_eq!(read(&path).unwrap().len(), 1);
        w.push(&json!({"name":"b","ph":"X","ts":3,"dur":2}));
        w.push(&json!({"name":"c","ph":"X","ts":5,"dur":2}));
        w.flush().unwrap();
        let evs = read(&path).unwrap();
        let names: Vec<&str> = evs.iter().filter_map(|e| e["name"].as_str()).collect();
        assert_eq!(names, vec!["a", "b", "c"]);
        let text = std::fs::read_to_string(&path).unwrap();
        let cut = &text[..text.len() - 30];
        std::fs::write(&path, cut).unwrap();
        let evs = read(&path).unwrap();
        assert_eq!(
            evs.len(),
            2,
            "the cut event is dropped, the whole ones kept"
        );
        std::fs::write(&path, "nonsense").unwrap();
        assert!(
            read(&path)
                .unwrap_err()
                .to_string()
                .contains("not a timeline")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
