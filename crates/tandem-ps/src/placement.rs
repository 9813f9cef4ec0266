//! Where each parameter lives: big tensors are cut into row ranges spread over the servers so bytes
//! per server are balanced; small ones stay whole. A pure function of the declarations, so every
//! process computes the same map, and its hash lets them check that they did.

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
        let (rows, row_len) = p.rows_and_row_len();
        let bytes = p.numel() * 4;
        let parts = if bytes <= min_part_bytes {
            1
        } else {
            rows.min(servers).min(bytes.div_ceil(min_part_bytes)).max(1)
        };
        let base = rows / parts;
        let extra = rows % parts;
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
        assert!(place(&[], 0, 1024).is_err());
        let mut half = ParamDecl::new("h", &[2], Init::Zeros);
        half.dtype = DType::F16;
        assert!(matches!(
            place(&[half], 1, 1024),
            Err(Error::DTypeMismatch { .. })
        ));
    }
}
