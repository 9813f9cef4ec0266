//! The IDX file format of MNIST and Fashion-MNIST (`train-images-idx3-ubyte`, ...), so users with
//! the real files can train on them: images become rows of `f32` in `[0, 1]`, labels `usize`.
//!
//! ```
//! use tandem_demo::idx;
//! let dir = std::env::temp_dir();
//! let images = dir.join(format!("doc-images-{}.idx", std::process::id()));
//! idx::write_u8(&images, &[2, 2, 2], &[0, 255, 128, 64, 1, 2, 3, 4]).unwrap();
//! let x = idx::read_images(&images).unwrap();
//! assert_eq!(x.dim(), (2, 4));
//! assert_eq!(x[[0, 1]], 1.0);
//! # std::fs::remove_file(images).unwrap();
//! ```
//!
//! Why check sizes first: an IDX header states its dimensions; a truncated download would
//! otherwise load as garbage rows.

use std::io::Write;
use std::path::Path;

use ndarray::Array2;
use tandem::{Error, Result};

/// Type code of unsigned bytes, the only element type MNIST uses.
const U8: u8 = 0x08;
/// Files larger than this are refused rather than read into memory.
const MAX_BYTES: u64 = 1 << 32;

/// Reads an IDX file: its dimensions and its bytes, checked against each other.
fn read(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let what = path.display().to_string();
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("reading {what}"), e))?
        .len();
    if len > MAX_BYTES {
        return Err(Error::invalid(
            &what,
            format!("{len} bytes is larger than the 4 GiB this loader reads"),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(format!("reading {what}"), e))?;
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(Error::invalid(
            &what,
            "not an IDX file (the magic number must start with two zero bytes)",
        ));
    }
    if bytes[2] != U8 {
        return Err(Error::invalid(
            &what,
            format!(
                "element type 0x{:02x} is not unsigned bytes (0x08)",
                bytes[2]
            ),
        ));
    }
    let ndim = usize::from(bytes[3]);
    let header = 4 + 4 * ndim;
    if ndim == 0 || bytes.len() < header {
        return Err(Error::invalid(
            &what,
            format!("truncated header for {ndim} dimensions"),
        ));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::invalid(&what, format!("dimensions {dims:?} overflow")))?;
    let data = &bytes[header..];
    if data.len() != count {
        return Err(Error::invalid(
            &what,
            format!(
                "dimensions {dims:?} need {count} bytes of data, the file has {}",
                data.len()
            ),
        ));
    }
    Ok((dims, data.to_vec()))
}

/// Reads an IDX image file (`n × rows × cols` bytes) as an `n × (rows·cols)` array scaled to `[0, 1]`.
pub fn read_images(path: &Path) -> Result<Array2<f32>> {
    let (dims, data) = read(path)?;
    if dims.len() < 2 {
        return Err(Error::invalid(
            path.display().to_string(),
            format!("an image file has at least 2 dimensions, this one {dims:?}"),
        ));
    }
    let n = dims[0];
    let per = dims[1..].iter().product::<usize>();
    let values = data.iter().map(|&b| f32::from(b) / 255.0).collect();
    Array2::from_shape_vec((n, per), values)
        .map_err(|e| Error::invalid(path.display().to_string(), e.to_string()))
}

/// Reads an IDX label file (`n` bytes) as class indices.
pub fn read_labels(path: &Path) -> Result<Vec<usize>> {
    let (dims, data) = read(path)?;
    if dims.len() != 1 {
        return Err(Error::invalid(
            path.display().to_string(),
            format!("a label file has 1 dimension, this one {dims:?}"),
        ));
    }
    Ok(data.into_iter().map(usize::from).collect())
}

/// Writes unsigned bytes of shape `dims` as an IDX file (for tests and small data sets).
pub fn write_u8(path: &Path, dims: &[usize], data: &[u8]) -> Result<()> {
    let what = path.display().to_string();
    let count: usize = dims.iter().product();
    if count != data.len() || dims.is_empty() || dims.len() > 255 {
        return Err(Error::invalid(
            &what,
            format!("{} bytes for dimensions {dims:?}", data.len()),
        ));
    }
    let mut out = vec![0, 0, U8, dims.len() as u8];
    for &d in dims {
        let d = u32::try_from(d)
            .map_err(|_| Error::invalid(&what, format!("dimension {d} is too large")))?;
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    let mut f =
        std::fs::File::create(path).map_err(|e| Error::io(format!("creating {what}"), e))?;
    f.write_all(&out)
        .map_err(|e| Error::io(format!("writing {what}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("tandem-idx-{}-{name}", std::process::id()))
    }

    #[test]
    fn images_and_labels_round_trip() {
        let (img, lab) = (tmp("img"), tmp("lab"));
        let pixels: Vec<u8> = (0..3 * 2 * 3).map(|i| (i * 13 % 256) as u8).collect();
        write_u8(&img, &[3, 2, 3], &pixels).unwrap();
        write_u8(&lab, &[3], &[7, 0, 9]).unwrap();
        let x = read_images(&img).unwrap();
        assert_eq!(x.dim(), (3, 6));
        for (i, &p) in pixels.iter().enumerate() {
            assert_eq!(x[[i / 6, i % 6]], f32::from(p) / 255.0);
        }
        assert_eq!(read_labels(&lab).unwrap(), [7, 0, 9]);
        std::fs::remove_file(img).unwrap();
        std::fs::remove_file(lab).unwrap();
    }

    #[test]
    fn damaged_files_are_refused_with_the_reason() {
        let p = tmp("bad");
        for (bytes, why) in [
            (vec![1u8, 0, 8, 1, 0, 0, 0, 1, 5], "magic"),
            (vec![0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0], "element type"),
            (vec![0, 0, 8, 2, 0, 0], "truncated"),
            (vec![0, 0, 8, 1, 0, 0, 0, 3, 1, 2], "need 3 bytes"),
        ] {
            std::fs::write(&p, bytes).unwrap();
            let e = read_labels(&p).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
        write_u8(&p, &[2], &[1, 2]).unwrap();
        assert!(
            read_images(&p)
                .unwrap_err()
                .to_string()
                .contains("at least 2")
        );
        std::fs::remove_file(p).unwrap();
    }
}
