//! Checkpoints of one server: parameters, optimizer state, versions, mode, optimizer and the
//! partition-map hash, in one file per server written atomically (temp file, fsync, rename), so a
//! crash mid-write leaves the previous checkpoint intact. A checksum catches torn or corrupt files.

use std::io::Write;
use std::path::{Path, PathBuf};

use tandem_core::{Error, Result};

use super::mode::{MAX_WORKERS, Mode};
use crate::optimizer::{Kind, Optimizer};

/// Checkpoints written now: checksummed with CRC-32 (hardware-accelerated: a state is checksummed
/// on every replicated update, so a byte-at-a-time hash would cost more than sending it).
const MAGIC: &[u8; 8] = b"TNDMCKP2";
/// Checkpoints of earlier versions, checksummed with FNV-1a, still read.
const MAGIC_V1: &[u8; 8] = b"TNDMCKP1";

/// One partition in a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct PartSnapshot {
    /// Parameter name.
    pub param: String,
    /// Partition index.
    pub part: u32,
    /// Full shape of the parameter.
    pub shape: Vec<u64>,
    /// First row.
    pub row_start: u64,
    /// Rows.
    pub rows: u64,
    /// Values.
    pub values: Vec<f32>,
    /// First moment / momentum.
    pub m: Vec<f32>,
    /// Second moment / Adagrad accumulator.
    pub v: Vec<f32>,
    /// Optimizer steps.
    pub t: u64,
    /// Updates applied to the partition.
    pub version: u64,
}

/// Everything a server needs to resume.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Partition-map hash.
    pub map_hash: u64,
    /// Server version (sync step or async updates).
    pub version: u64,
    /// Mode.
    pub mode: Mode,
    /// Optimizer.
    pub optimizer: Optimizer,
    /// Partitions.
    pub parts: Vec<PartSnapshot>,
}

/// The checkpoint file of server `index` in `dir`.
pub fn path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("ps-{index}.ckpt"))
}

/// Appends the checkpoint's fields, little-endian.
struct Writer(Vec<u8>);

impl Writer {
    /// A u64.
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// An f32.
    fn f32(&mut self, v: f32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A string: its length, then its bytes.
    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }
    /// Floats: their count, then their bytes.
    fn floats(&mut self, v: &[f32]) {
        self.u64(v.len() as u64);
        self.0.extend_from_slice(bytemuck::cast_slice(v));
    }
}

/// Reads a checkpoint's fields, every length checked against what is left.
struct Reader<'a> {
    /// The file's bytes.
    b: &'a [u8],
    /// Where reading is.
    at: usize,
    /// The file's name, for errors.
    file: String,
}

impl<'a> Reader<'a> {
    /// The error of a file that is not a whole checkpoint, naming it and what was being read.
    fn bad(&self, what: &str) -> Error {
        Error::invalid(
            "checkpoint",
            format!("{} is corrupt: {what} at byte {}", self.file, self.at),
        )
    }
    /// The next `n` bytes.
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or_else(|| self.bad("truncated"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    /// A u64.
    fn u64(&mut self) -> Result<u64> {
        let s = self.take(8)?;
        Ok(u64::from_le_bytes(s.try_into().unwrap_or_default()))
    }
    /// An f32.
    fn f32(&mut self) -> Result<f32> {
        let s = self.take(4)?;
        Ok(f32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    /// A count of items of `unit` bytes, refused when more than the file has left.
    fn len(&mut self, unit: usize) -> Result<usize> {
        let n = self.u64()? as usize;
        if n.saturating_mul(unit) > self.b.len() - self.at {
            return Err(self.bad("length beyond the end"));
        }
        Ok(n)
    }
    /// A string written by [`Writer::str`].
    fn str(&mut self) -> Result<String> {
        let n = self.len(1)?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| self.bad("non-UTF-8 name"))
    }
    /// Floats written by [`Writer::floats`], as bytes (copied into place by the caller).
    fn float_bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.len(4)?;
        self.take(n * 4)
    }
}

/// FNV-1a, the checksum of version-1 checkpoints.
fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
        (h ^ *x as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// CRC-32 (IEEE), the checksum of checkpoints written now.
fn crc(b: &[u8]) -> u64 {
    u64::from(crc32fast::hash(b))
}

/// One partition as it is written: borrowed from a snapshot, or from a live model under its lock.
pub(crate) struct PartView<'a> {
    /// The parameter.
    pub(crate) param: &'a str,
    /// The partition's index.
    pub(crate) part: u32,
    /// The parameter's whole shape.
    pub(crate) shape: &'a [u64],
    /// The partition's first row.
    pub(crate) row_start: u64,
    /// The partition's rows.
    pub(crate) rows: u64,
    /// The optimizer's step count.
    pub(crate) t: u64,
    /// Updates applied to the partition.
    pub(crate) version: u64,
    /// The values.
    pub(crate) values: &'a [f32],
    /// The optimizer's first moment (empty when it keeps none).
    pub(crate) m: &'a [f32],
    /// The optimizer's second moment (empty when it keeps none).
    pub(crate) v: &'a [f32],
}

/// What a state holds besides its partitions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Header {
    /// Hash of the partition map the checkpoint belongs to.
    pub(crate) map_hash: u64,
    /// The server's version.
    pub(crate) version: u64,
    /// The training mode.
    pub(crate) mode: Mode,
    /// The optimizer.
    pub(crate) optimizer: Optimizer,
}

/// Writes a state into `out` (cleared first, its allocation reused): the header, `parts` partitions
/// written by `write_parts` (one [`PartView`] each), then the checksum.
pub(crate) fn encode_with(
    out: &mut Vec<u8>,
    h: &Header,
    parts: usize,
    write_parts: impl FnOnce(&mut dyn FnMut(PartView<'_>)),
) {
    out.clear();
    let mut w = Writer(std::mem::take(out));
    w.0.extend_from_slice(MAGIC);
    w.u64(h.map_hash);
    w.u64(h.version);
    w.u64(u64::from(h.mode.sync));
    w.u64(h.mode.workers as u64);
    w.u64(h.mode.replicas_to_aggregate as u64);
    w.u64(h.mode.staleness.map_or(u64::MAX, u64::from));
    w.u64(u64::from(h.mode.reject_non_finite));
    let o = &h.optimizer;
    w.str(o.kind_name());
    for v in [
        o.lr,
        o.momentum,
        o.beta1,
        o.beta2,
        o.eps,
        o.weight_decay,
        o.clip_norm,
        o.decay_rate,
    ] {
        w.f32(v);
    }
    w.u64(o.decay_steps);
    w.u64(parts as u64);
    write_parts(&mut |p: PartView<'_>| {
        w.str(p.param);
        w.u64(p.part as u64);
        w.u64(p.shape.len() as u64);
        p.shape.iter().for_each(|d| w.u64(*d));
        w.u64(p.row_start);
        w.u64(p.rows);
        w.u64(p.t);
        w.u64(p.version);
        w.floats(p.values);
        w.floats(p.m);
        w.floats(p.v);
    });
    let sum = crc(&w.0);
    w.u64(sum);
    *out = w.0;
}

/// The bytes of a checkpoint (also a replicated state): header, partitions, checksum.
pub(crate) fn encode(s: &Snapshot) -> Vec<u8> {
    let floats: usize = s
        .parts
        .iter()
        .map(|p| p.values.len() + p.m.len() + p.v.len())
        .sum();
    let mut out = Vec::with_capacity(4096 + floats * 4 + s.parts.len() * 128);
    let h = Header {
        map_hash: s.map_hash,
        version: s.version,
        mode: s.mode,
        optimizer: s.optimizer,
    };
    encode_with(&mut out, &h, s.parts.len(), |write| {
        for p in &s.parts {
            write(PartView {
                param: &p.param,
                part: p.part,
                shape: &p.shape,
                row_start: p.row_start,
                rows: p.rows,
                t: p.t,
                version: p.version,
                values: &p.values,
                m: &p.m,
                v: &p.v,
            });
        }
    });
    out
}

/// One partition as read, its floats still the encoded bytes (native byte order, as written).
pub(crate) struct PartBytes<'a> {
    /// The parameter.
    pub(crate) param: String,
    /// The partition's index.
    pub(crate) part: u32,
    /// The parameter's whole shape.
    pub(crate) shape: Vec<u64>,
    /// The partition's first row.
    pub(crate) row_start: u64,
    /// The partition's rows.
    pub(crate) rows: u64,
    /// The optimizer's step count.
    pub(crate) t: u64,
    /// Updates applied to the partition.
    pub(crate) version: u64,
    /// The values' bytes.
    pub(crate) values: &'a [u8],
    /// The first moment's bytes.
    pub(crate) m: &'a [u8],
    /// The second moment's bytes.
    pub(crate) v: &'a [u8],
}

/// Checks a state's magic and checksum, reads its header, then hands every partition to `part`
/// (stopping at its first error).
pub(crate) fn visit(
    b: &[u8],
    file: String,
    mut part: impl FnMut(&Header, PartBytes<'_>) -> Result<()>,
) -> Result<Header> {
    let checksum: fn(&[u8]) -> u64 = match b.get(..8) {
        Some(m) if b.len() >= MAGIC.len() + 8 && m == MAGIC => crc,
        Some(m) if b.len() >= MAGIC.len() + 8 && m == MAGIC_V1 => fnv,
        _ => {
            return Err(Error::invalid(
                "checkpoint",
                format!("{file} is not a Tandem checkpoint"),
            ));
        }
    };
    let (body, sum) = b.split_at(b.len() - 8);
    if checksum(body) != u64::from_le_bytes(sum.try_into().unwrap_or_default()) {
        return Err(Error::invalid(
            "checkpoint",
            format!("{file} is corrupt: checksum mismatch"),
        ));
    }
    let mut r = Reader {
        b: body,
        at: 8,
        file,
    };
    let map_hash = r.u64()?;
    let version = r.u64()?;
    let mode = read_mode(&mut r)?;
    let optimizer = read_optimizer(&mut r)?;
    let h = Header {
        map_hash,
        version,
        mode,
        optimizer,
    };
    let n = r.len(1)?;
    for _ in 0..n {
        let p = read_part(&mut r)?;
        part(&h, p)?;
    }
    Ok(h)
}

/// A checkpoint read back, checked whole; `file` names it in errors.
pub(crate) fn decode(b: &[u8], file: String) -> Result<Snapshot> {
    let mut parts = Vec::new();
    let floats = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let h = visit(b, file, |_, p| {
        parts.push(PartSnapshot {
            param: p.param,
            part: p.part,
            shape: p.shape,
            row_start: p.row_start,
            rows: p.rows,
            values: floats(p.values),
            m: floats(p.m),
            v: floats(p.v),
            t: p.t,
            version: p.version,
        });
        Ok(())
    })?;
    Ok(Snapshot {
        map_hash: h.map_hash,
        version: h.version,
        mode: h.mode,
        optimizer: h.optimizer,
        parts,
    })
}

/// The training mode a checkpoint recorded.
fn read_mode(r: &mut Reader<'_>) -> Result<Mode> {
    let sync = r.u64()? == 1;
    let max = u64::from(MAX_WORKERS);
    let workers = r.u64()?;
    let workers = u32::try_from(workers)
        .ok()
        .filter(|w| (1..=max).contains(&u64::from(*w)))
        .ok_or_else(|| r.bad(&format!("{workers} workers (1 to {max})")))?;
    let replicas_to_aggregate = r.u64()?;
    let replicas_to_aggregate = u32::try_from(replicas_to_aggregate)
        .ok()
        .filter(|k| (1..=workers).contains(k))
        .ok_or_else(|| {
            r.bad(&format!(
                "{replicas_to_aggregate} of {workers} workers to aggregate"
            ))
        })?;
    let staleness = match r.u64()? {
        u64::MAX => None,
        s => Some(s as u32),
    };
    Ok(Mode {
        sync,
        workers,
        replicas_to_aggregate,
        staleness,
        reject_non_finite: r.u64()? == 1,
    })
}

/// The optimizer a checkpoint recorded.
fn read_optimizer(r: &mut Reader<'_>) -> Result<Optimizer> {
    let kind: Kind = Optimizer::kind_from_name(&r.str()?)?;
    let mut f = [0f32; 8];
    for x in f.iter_mut() {
        *x = r.f32()?;
    }
    Ok(Optimizer {
        kind,
        lr: f[0],
        momentum: f[1],
        beta1: f[2],
        beta2: f[3],
        eps: f[4],
        weight_decay: f[5],
        clip_norm: f[6],
        decay_rate: f[7],
        decay_steps: r.u64()?,
    })
}

/// One partition of a checkpoint, its floats left as bytes.
fn read_part<'a>(r: &mut Reader<'a>) -> Result<PartBytes<'a>> {
    let param = r.str()?;
    let part = r.u64()? as u32;
    let dims = r.len(8)?;
    let shape = (0..dims).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
    Ok(PartBytes {
        param,
        part,
        shape,
        row_start: r.u64()?,
        rows: r.u64()?,
        t: r.u64()?,
        version: r.u64()?,
        values: r.float_bytes()?,
        m: r.float_bytes()?,
        v: r.float_bytes()?,
    })
}

/// Writes `snap` as server `index`'s checkpoint in `dir`, atomically.
pub fn write(dir: &Path, index: usize, snap: &Snapshot) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let final_path = path(dir, index);
    let tmp = dir.join(format!(".ps-{index}.ckpt.tmp-{}", std::process::id()));
    let bytes = encode(snap);
    let io = |what: &str, e| Error::io(format!("{what} {}", tmp.display()), e);
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating", e))?;
    f.write_all(&bytes).map_err(|e| io("writing", e))?;
    f.sync_all().map_err(|e| io("syncing", e))?;
    drop(f);
    std::fs::rename(&tmp, &final_path).map_err(|e| {
        Error::io(
            format!("renaming {} to {}", tmp.display(), final_path.display()),
            e,
        )
    })?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(final_path)
}

/// Reads server `index`'s checkpoint from `dir`, if there is one.
pub fn read(dir: &Path, index: usize) -> Result<Option<Snapshot>> {
    let p = path(dir, index);
    match std::fs::read(&p) {
        Ok(b) => decode(&b, p.display().to_string()).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("reading {}", p.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            map_hash: 42,
            version: 17,
            mode: Mode {
                sync: true,
                workers: 4,
                replicas_to_aggregate: 3,
                staleness: None,
                reject_non_finite: true,
            },
            optimizer: Optimizer::adamw(0.01, 0.1),
            parts: vec![PartSnapshot {
                param: "w".into(),
                part: 1,
                shape: vec![10, 3],
                row_start: 5,
                rows: 5,
                values: (0..15).map(|i| i as f32 * 0.5).collect(),
                m: vec![0.25; 15],
                v: vec![0.125; 15],
                t: 17,
                version: 17,
            }],
        }
    }

    #[test]
    fn a_checkpoint_naming_too_many_workers_is_refused() {
        let at_bound = |workers: u32, k: u32| {
            let mut s = sample();
            s.mode.workers = workers;
            s.mode.replicas_to_aggregate = k;
            decode(&encode(&s), "c".into())
        };
        let max = super::MAX_WORKERS;
        assert_eq!(at_bound(max, max).expect("at the bound").mode.workers, max);
        assert_eq!(at_bound(1, 1).expect("one").mode.workers, 1);
        for (w, k) in [(max + 1, 1), (0, 0), (4, 5), (4, 0)] {
            let e = at_bound(w, k).expect_err("out of bounds").to_string();
            assert!(
                e.contains("corrupt") && e.contains("workers"),
                "{w} {k}: {e}"
            );
        }
    }

    #[test]
    fn checkpoints_of_the_first_format_are_still_read_and_checked() {
        let s = sample();
        let mut b = encode(&s);
        assert_eq!(&b[..8], MAGIC);
        // The same body under the first format's magic and checksum.
        b.truncate(b.len() - 8);
        b[..8].copy_from_slice(MAGIC_V1);
        let sum = fnv(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        assert_eq!(decode(&b, "v1".into()).expect("v1 checkpoint"), s);
        // A v1 body with a CRC (or the other way round) fails its check.
        let mut wrong = b.clone();
        let n = wrong.len();
        wrong[n - 8..].copy_from_slice(&crc(&b[..n - 8]).to_le_bytes());
        let e = decode(&wrong, "mixed".into()).expect_err("wrong checksum kind");
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
        let mut flipped = b;
        flipped[20] ^= 1;
        assert!(decode(&flipped, "flipped".into()).is_err());
        assert!(decode(b"TNDMCKP3........", "v3".into()).is_err());
    }

    #[test]
    fn round_trip_and_corruption_is_detected() {
        let dir = std::env::temp_dir().join(format!("tandem-ckpt-{}", std::process::id()));
        let s = sample();
        write(&dir, 1, &s).unwrap();
        assert_eq!(read(&dir, 1).unwrap(), Some(s.clone()));
        assert_eq!(read(&dir, 7).unwrap(), None);
        let p = path(&dir, 1);
        let mut b = std::fs::read(&p).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0xff;
        std::fs::write(&p, &b).unwrap();
        assert!(read(&dir, 1).unwrap_err().to_string().contains("corrupt"));
        std::fs::write(&p, &b[..20]).unwrap();
        assert!(read(&dir, 1).is_err());
        // A new write replaces the damaged file whole.
        write(&dir, 1, &s).unwrap();
        assert_eq!(read(&dir, 1).unwrap(), Some(s));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
