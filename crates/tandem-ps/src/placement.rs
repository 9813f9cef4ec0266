//! Where each parameter lives: big tensors are cut into row ranges spread over the servers so bytes
//! per server are balanced; small ones stay whole. A pure function of the declarations, so every
//! process computes the same map, and its hash lets them check that they did.
//!
//! Why row ranges: cutting a tensor along its rows keeps each partition a contiguous slice of the
//! tensor (a pull writes it in place, no gather) and lets the optimizer's state be cut the same way.
//! Why balance bytes rather than tensors: one large embedding would otherwise make one server the
//! bottleneck of every step.

use tandem_core::{DType, Error, Result};

use crate::init::Init;

/// A parameter as workers declare it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamDecl {
    /// Unique name.
    pub name: String,
    /// Shape; partitions cut the first dimension.
    pub shape: Vec<usize>,
    /// Element type (the servers compute in f32).
    pub dtype: DType,
    /// How the servers initialise it.
    pub init: Init,
}

impl ParamDecl {
    /// A parameter named `name` of `shape`, f32, initialised by `init`.
    pub fn new(name: impl Into<String>, shape: &[usize], init: Init) -> Self {
        ParamDecl {
            name: name.into(),
            shape: shape.to_vec(),
            dtype: DType::F32,
            init,
        }
    }

    /// Rows (first dimension; 1 for a scalar) and elements per row.
    pub fn rows_and_row_len(&self) -> (usize, usize) {
        match self.shape.split_first() {
            None => (1, 1),
            Some((rows, rest)) => (*rows, rest.iter().product()),
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One partition: rows `row_start..row_start + rows` of a parameter, on one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// Parameter name.
    pub param: String,
    /// Partition index within the parameter.
    pub part: u32,
    /// Server index.
    pub server: usize,
    /// First row.
    pub row_start: usize,
    /// Number of rows.
    pub rows: usize,
    /// Elements per row.
    pub row_len: usize,
}

impl Part {
    /// Elements in this partition.
    pub fn numel(&self) -> usize {
        self.rows * self.row_len
    }
    /// Element range within the whole parameter.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.row_start * self.row_len..(self.row_start + self.rows) * self.row_len
    }
}

/// The agreed placement of every parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionMap {
    /// The declarations, in declaration order.
    pub params: Vec<ParamDecl>,
    /// Every partition.
    pub parts: Vec<Part>,
    /// Number of servers.
    pub servers: usize,
}

/// Tensors up to this many bytes stay whole.
pub const DEFAULT_MIN_PART_BYTES: usize = 1 << 20;

/// Places `params` on `servers` servers.
///
/// ```
/// use tandem_ps::placement::{ParamDecl, place};
/// use tandem_ps::init::Init;
/// let params = vec![ParamDecl::new("w", &[1 << 20, 4], Init::Zeros), ParamDecl::new("b", &[4], Init::Zeros)];
/// let map = place(&params, 2, 1 << 20).unwrap();
/// assert_eq!(map.parts.iter().filter(|p| p.param == "w").count(), 2);
/// ```
pub fn place(params: &[ParamDecl], servers: usize, min_part_bytes: usize) -> Result<PartitionMap> {
    place_split(params, servers, min_part_bytes, 0)
}

/// Like [`place`], also cutting every tensor larger than `max_part_bytes` into partitions of at
/// most that many bytes (whole rows: one row when a row is larger); 0 sets no limit.
///
/// Why: a sync step's partitions are applied one after the other, and a pull overlapping the push
/// ([`crate::client::Client::push_pull_into`]) streams each as soon as it is applied; one large
/// tensor in one partition leaves nothing to overlap. BytePS cuts tensors into 4 MB partitions
/// for the same reason. The partition map is part of a checkpoint: restore with the same limit.
///
/// ```
/// use tandem_ps::placement::{ParamDecl, place_split};
/// use tandem_ps::init::Init;
/// let params = vec![ParamDecl::new("w", &[1 << 20, 4], Init::Zeros)];
/// let map = place_split(&params, 1, 1 << 20, 4 << 20).unwrap();
/// assert_eq!(map.parts.len(), 4);
/// assert!(map.parts.iter().all(|p| p.numel() * 4 <= 4 << 20));
/// ```
pub fn place_split(
    params: &[ParamDecl],
    servers: usize,
    min_part_bytes: usize,
    max_part_bytes: usize,
) -> Result<PartitionMap> {
    if max_part_bytes != 0 && max_part_bytes < min_part_bytes {
        return Err(Error::invalid(
            "max_part_bytes",
            format!("{max_part_bytes} is below min_part_bytes {min_part_bytes} (0: no limit)"),
        ));
    }
    if servers == 0 {
        return Err(Error::invalid(
            "servers",
            "a parameter-server job needs at least one server",
        ));
    }
    let mut names = std::collections::BTreeSet::new();
    let mut pieces = Vec::new();
    for p in params {
        if !names.insert(p.name.as_str()) {
            return Err(Error::invalid(
                "params",
                format!("parameter {:?} is declared twice", p.name),
            ));
        }
        check_declaration(p)?;
        let (rows, row_len) = p.rows_and_row_len();
        let parts = part_count(
            p.numel() * 4,
            rows,
            row_len,
            servers,
            min_part_bytes,
            max_part_bytes,
        );
        let (base, extra) = (rows / parts, rows % parts);
        let mut start = 0;
        for i in 0..parts {
            let n = base + usize::from(i < extra);
            pieces.push(Part {
                param: p.name.clone(),
                part: i as u32,
                server: 0,
                row_start: start,
                rows: n,
                row_len,
            });
            start += n;
        }
    }
    // Largest first onto the least-loaded server: balanced bytes, deterministic ties.
    let mut order: Vec<usize> = (0..pieces.len()).collect();
    order.sort_by(|&a, &b| pieces[b].numel().cmp(&pieces[a].numel()).then(a.cmp(&b)));
    let mut load = vec![0usize; servers];
    for i in order {
        let (server, _) = load
            .iter()
            .enumerate()
            .min_by_key(|(s, l)| (**l, *s))
            .unwrap_or((0, &0));
        pieces[i].server = server;
        load[server] += pieces[i].numel();
    }
    Ok(PartitionMap {
        params: params.to_vec(),
        parts: pieces,
        servers,
    })
}

/// A declaration a server can hold: a name of 1 to 256 bytes, f32, at least one element.
fn check_declaration(p: &ParamDecl) -> Result<()> {
    if p.name.is_empty() || p.name.len() > 256 {
        return Err(Error::invalid(
            "params",
            format!("parameter name {:?} must be 1 to 256 bytes", p.name),
        ));
    }
    if p.dtype != DType::F32 {
        return Err(Error::DTypeMismatch {
            name: p.name.clone(),
            expected: DType::F32,
            got: p.dtype,
        });
    }
    if p.numel() == 0 {
        return Err(Error::ShapeMismatch {
            name: p.name.clone(),
            expected: vec![1],
            got: p.shape.clone(),
        });
    }
    Ok(())
}

/// How many row ranges a tensor of `bytes` in `rows` rows of `row_len` is cut into: one when it is
/// small, else up to one per server (no piece under `min_part_bytes`), and more when pieces would
/// exceed `max_part_bytes` (0: no limit).
fn part_count(
    bytes: usize,
    rows: usize,
    row_len: usize,
    servers: usize,
    min_part_bytes: usize,
    max_part_bytes: usize,
) -> usize {
    let mut parts = if bytes <= min_part_bytes {
        1
    } else {
        rows.min(servers)
            .min(bytes.div_ceil(min_part_bytes.max(1)))
            .max(1)
    };
    if max_part_bytes != 0 {
        // Rows per partition that fit, so no partition (ceil(rows / parts) rows) is larger
        // (a tensor within the limit fits whole: one partition).
        let fit = (max_part_bytes / (row_len * 4)).max(1);
        parts = parts.max(rows.div_ceil(fit));
    }
    parts
}

impl PartitionMap {
    /// A stable hash of the whole map (FNV-1a over a canonical text), to detect disagreement.
    pub fn hash(&self) -> u64 {
        let mut text = format!("servers={};", self.servers);
        for p in &self.params {
            text.push_str(&format!(
                "{}:{:?}:{}:{:?};",
                p.name, p.shape, p.dtype, p.init
            ));
        }
        for p in &self.parts {
            text.push_str(&format!(
                "{}/{}@{}:{}+{}x{};",
                p.param, p.part, p.server, p.row_start, p.rows, p.row_len
            ));
        }
        text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        })
    }

    /// The declaration of `name`.
    pub fn param(&self, name: &str) -> Option<&ParamDecl> {
        self.params.iter().find(|p| p.name == name)
    }

    /// The partitions of `name`, in row order.
    pub fn parts_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Part> + 'a {
        self.parts.iter().filter(move |p| p.param == name)
    }

    /// Bytes placed on each server.
    pub fn bytes_per_server(&self) -> Vec<usize> {
        let mut v = vec![0; self.servers];
        for p in &self.parts {
            v[p.server] += p.numel() * 4;
        }
        v
    }
}

/// The rendezvous key under which a job's partition map hash is agreed.
pub const MAP_KEY: &str = "tandem/ps/partition-map";

/// Agrees on the partition map through the job's rendezvous: the process that decides (the chief)
/// publishes the map's hash; every other process waits for it (up to `timeout`) and fails with an
/// error naming both hashes if its own map differs. Servers check the same hash on every declaration.
pub async fn agree(
    rendezvous: &tandem_rendezvous::Client,
    map: &PartitionMap,
    decide: bool,
    timeout: std::time::Duration,
) -> Result<()> {
    let mine = format!("{:016x}", map.hash());
    let theirs = if decide {
        let swap = rendezvous
            .compare_and_set(MAP_KEY, None, mine.clone())
            .await?;
        swap.current.unwrap_or_default()
    } else {
        rendezvous
            .wait(&[MAP_KEY], timeout)
            .await?
            .into_iter()
            .next()
            .unwrap_or_default()
    };
    let theirs = String::from_utf8_lossy(&theirs).into_owned();
    if theirs != mine {
        return Err(Error::config(
            "partition map",
            format!(
                "this process computed partition map {mine} but the job agreed on {theirs}: declare the same parameters, in the same order, with the same number of servers"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_tensors_are_split_and_bytes_balance() {
        let params = vec![
            ParamDecl::new("emb", &[100_000, 64], Init::Zeros),
            ParamDecl::new("w1", &[512, 512], Init::Zeros),
            ParamDecl::new("b1", &[512], Init::Zeros),
            ParamDecl::new("scalar", &[], Init::Zeros),
        ];
        let map = place(&params, 3, DEFAULT_MIN_PART_BYTES).unwrap();
        assert_eq!(map.parts_of("emb").count(), 3);
        assert_eq!(map.parts_of("b1").count(), 1);
        let rows: usize = map.parts_of("emb").map(|p| p.rows).sum();
        assert_eq!(rows, 100_000);
        let b = map.bytes_per_server();
        let (min, max) = (*b.iter().min().unwrap(), *b.iter().max().unwrap());
        assert!(max - min <= 1 << 20, "{b:?}");
        assert_eq!(
            place(&params, 3, DEFAULT_MIN_PART_BYTES).unwrap().hash(),
            map.hash()
        );
        assert_ne!(
            place(&params, 2, DEFAULT_MIN_PART_BYTES).unwrap().hash(),
            map.hash()
        );
    }

    #[test]
    fn a_partition_size_limit_cuts_large_tensors_in_whole_rows() {
        // 10 rows of 10 f32 (40 bytes each): 140 bytes fit 3 rows, so 4 partitions of 3,3,2,2 rows.
        let params = vec![
            ParamDecl::new("w", &[10, 10], Init::Zeros),
            ParamDecl::new("b", &[35], Init::Zeros),
        ];
        let map = place_split(&params, 1, 0, 140).unwrap();
        let rows: Vec<usize> = map.parts_of("w").map(|p| p.rows).collect();
        assert_eq!(rows, vec![3, 3, 2, 2]);
        let starts: Vec<usize> = map.parts_of("w").map(|p| p.row_start).collect();
        assert_eq!(starts, vec![0, 3, 6, 8]);
        // A tensor of exactly the limit stays whole; one element more is cut.
        assert_eq!(map.parts_of("b").count(), 1);
        assert_eq!(
            place_split(&params, 1, 0, 139)
                .unwrap()
                .parts_of("b")
                .count(),
            2
        );
        // A row larger than the limit: one row per partition.
        assert_eq!(
            place_split(&params, 1, 0, 39)
                .unwrap()
                .parts_of("w")
                .count(),
            10
        );
        // Without a limit: as `place`.
        assert_eq!(
            place_split(&params, 2, 64, 0).unwrap(),
            place(&params, 2, 64).unwrap()
        );
        // Spread over servers, bytes still balance, and the limit changes the map's hash.
        let two = place_split(&params, 2, 0, 140).unwrap();
        assert_eq!(two.bytes_per_server().iter().sum::<usize>(), 4 * 135);
        assert!(two.parts.iter().any(|p| p.server == 1));
        assert_ne!(two.hash(), place(&params, 2, 0).unwrap().hash());
        // The minimum size: a tensor of exactly that many bytes stays whole, one byte less is cut.
        let w16 = [ParamDecl::new("w", &[16], Init::Zeros)];
        assert_eq!(place(&w16, 2, 64).unwrap().parts.len(), 1);
        assert_eq!(place(&w16, 2, 63).unwrap().parts.len(), 2);
        // No minimum size (0) cuts across servers without dividing by zero.
        assert_eq!(place(&params, 2, 0).unwrap().parts_of("w").count(), 2);
        // A limit below the minimum size is refused; equal is allowed.
        let e = place_split(&params, 1, 200, 199).unwrap_err().to_string();
        assert!(e.contains("max_part_bytes") && e.contains("199"), "{e}");
        assert!(place_split(&params, 1, 200, 200).is_ok());
    }

    #[test]
    fn bad_declarations_are_errors() {
        let dup = vec![
            ParamDecl::new("a", &[2], Init::Zeros),
            ParamDecl::new("a", &[3], Init::Zeros),
        ];
        assert!(
            place(&dup, 1, 1024)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        assert!(place(&[ParamDecl::new("z", &[0, 3], Init::Zeros)], 1, 1024).is_err());
        // Names of 1 to 256 bytes.
        let named = |n: usize| place(&[ParamDecl::new("x".repeat(n), &[2], Init::Zeros)], 1, 1024);
        assert!(named(0).unwrap_err().to_string().contains("1 to 256 bytes"));
        assert!(named(1).is_ok() && named(256).is_ok());
        assert!(
            named(257)
                .unwrap_err()
                .to_string()
                .contains("1 to 256 bytes")
        );
        assert!(place(&[], 0, 1024).is_err());
        let mut half = ParamDecl::new("h", &[2], Init::Zeros);
        half.dtype = DType::F16;
        assert!(matches!(
            place(&[half], 1, 1024),
            Err(Error::DTypeMismatch { .. })
        ));
    }
}
