//! Wire formats: the connection handshake and the header every operation carries.
//!
//! Why a header per operation: ranks of a group must call the same operations in the same order;
//! when they do not (a rank skipped a step, or called broadcast where the others called allreduce),
//! mixing their bytes would give silently wrong numbers. Each operation's fixed 32-byte header
//! (sequence number, kind, dtype, element count, root, reduce op) is exchanged first and compared,
//! and its `Display` is what error messages quote, so both calls are named. The handshake
//! (magic, version, rank, group id, token) keeps strangers, other groups and other jobs off the
//! mesh before any operation starts.

use std::fmt;

use tandem_core::{DType, ReduceOp};

/// First bytes of every connection.
pub const HELLO_MAGIC: [u8; 4] = *b"TNDM";
/// Version of the wire protocol.
pub const PROTOCOL_VERSION: u16 = 1;
/// Longest token a handshake may carry.
pub const MAX_TOKEN_LEN: usize = 512;

/// Reply byte: admitted.
pub const HELLO_OK: u8 = 1;
/// Reply byte: refused because of the token.
pub const HELLO_BAD_TOKEN: u8 = 2;
/// Reply byte: refused because of the rank or group.
pub const HELLO_BAD_PEER: u8 = 3;

/// The fixed part of a handshake: magic, version, rank, group id, token length.
pub const HELLO_FIXED: usize = 4 + 2 + 4 + 8 + 2;

/// Encodes a handshake.
pub fn encode_hello(rank: u32, group: u64, token: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(HELLO_FIXED + token.len());
    v.extend_from_slice(&HELLO_MAGIC);
    v.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    v.extend_from_slice(&rank.to_le_bytes());
    v.extend_from_slice(&group.to_le_bytes());
    v.extend_from_slice(&(token.len().min(u16::MAX as usize) as u16).to_le_bytes());
    v.extend_from_slice(token.as_bytes());
    v
}

/// The fixed part of a received handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloFixed {
    /// Sender's rank.
    pub rank: u32,
    /// Sender's group id.
    pub group: u64,
    /// Length of the token that follows.
    pub token_len: usize,
}

/// Why bytes a peer sent are not a handshake or an operation header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The handshake does not start with Tandem's magic.
    #[error("not a Tandem connection (bad magic)")]
    NotTandem,
    /// Another version of the protocol.
    #[error("protocol version {0}, expected {PROTOCOL_VERSION}")]
    Version(u16),
    /// A token longer than any Tandem sends.
    #[error("token of {0} bytes is too long")]
    TokenTooLong(usize),
    /// The stream is not at an operation header.
    #[error("stream out of step: expected an operation header")]
    OutOfStep,
    /// A field holds a code this version does not know.
    #[error("unknown {field} {code}")]
    Unknown {
        /// Which field.
        field: &'static str,
        /// Its value.
        code: u8,
    },
}

/// Decodes the fixed part of a handshake, or says why it is not one.
pub fn decode_hello(b: &[u8; HELLO_FIXED]) -> Result<HelloFixed, FrameError> {
    if b[..4] != HELLO_MAGIC {
        return Err(FrameError::NotTandem);
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != PROTOCOL_VERSION {
        return Err(FrameError::Version(version));
    }
    let token_len = u16::from_le_bytes([b[18], b[19]]) as usize;
    if token_len > MAX_TOKEN_LEN {
        return Err(FrameError::TokenTooLong(token_len));
    }
    Ok(HelloFixed {
        rank: u32::from_le_bytes([b[6], b[7], b[8], b[9]]),
        group: u64::from_le_bytes(b[10..18].try_into().unwrap_or_default()),
        token_len,
    })
}

/// A stable 64-bit id of a group name (FNV-1a), so connections of different groups never mix.
pub fn group_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What kind of operation a header announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpKind {
    /// Ring allreduce.
    Allreduce = 1,
    /// Chain broadcast from a root.
    Broadcast = 2,
    /// Ring allgather.
    Allgather = 3,
    /// Ring reduce-scatter.
    ReduceScatter = 4,
    /// Reduce to a root.
    Reduce = 5,
    /// Barrier.
    Barrier = 6,
    /// Point-to-point message.
    Send = 7,
}

impl OpKind {
    /// The kind of wire code `v`; `None` for an unknown code.
    fn from_u8(v: u8) -> Option<OpKind> {
        use OpKind::*;
        [
            Allreduce,
            Broadcast,
            Allgather,
            ReduceScatter,
            Reduce,
            Barrier,
            Send,
        ]
        .into_iter()
        .find(|k| *k as u8 == v)
    }

    /// The name users know the operation by.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Allreduce => "allreduce",
            OpKind::Broadcast => "broadcast",
            OpKind::Allgather => "allgather",
            OpKind::ReduceScatter => "reduce_scatter",
            OpKind::Reduce => "reduce",
            OpKind::Barrier => "barrier",
            OpKind::Send => "send",
        }
    }
}

/// The header every operation sends first, so ranks that called different things find out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpHeader {
    /// Sequence number of the operation in its stream (collectives, or one pair's messages).
    pub seq: u64,
    /// The operation.
    pub kind: OpKind,
    /// Element type.
    pub dtype: DType,
    /// Reduce operator, for reducing operations.
    pub op: Option<ReduceOp>,
    /// Root (broadcast, reduce) or destination (send).
    pub root: u32,
    /// Element count (per rank for allgather).
    pub count: u64,
}

/// Size of an encoded [`OpHeader`].
pub const HEADER_LEN: usize = 32;
/// Begins every operation header: a stream out of step shows at once.
const HEADER_MAGIC: [u8; 4] = *b"TOP1";

impl OpHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(&HEADER_MAGIC);
        b[4] = self.kind as u8;
        b[5] = self.dtype.code();
        b[6] = self.op.map_or(255, ReduceOp::code);
        b[8..12].copy_from_slice(&self.root.to_le_bytes());
        b[12..20].copy_from_slice(&self.seq.to_le_bytes());
        b[20..28].copy_from_slice(&self.count.to_le_bytes());
        b
    }

    /// Decodes a header, or says why the bytes are not one.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<OpHeader, FrameError> {
        if b[..4] != HEADER_MAGIC {
            return Err(FrameError::OutOfStep);
        }
        let unknown = |field, code| FrameError::Unknown { field, code };
        let kind = OpKind::from_u8(b[4]).ok_or_else(|| unknown("operation kind", b[4]))?;
        let dtype = DType::from_code(b[5]).ok_or_else(|| unknown("dtype code", b[5]))?;
        let op = if b[6] == 255 {
            None
        } else {
            Some(ReduceOp::from_code(b[6]).ok_or_else(|| unknown("reduce op code", b[6]))?)
        };
        let word =
            |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().unwrap_or_default());
        Ok(OpHeader {
            kind,
            dtype,
            op,
            root: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            seq: word(12..20),
            count: word(20..28),
        })
    }

    /// Whether two ranks called the same operation (the sequence number included).
    pub fn same_call(&self, other: &OpHeader) -> bool {
        self == other
    }
}

impl fmt::Display for OpHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.kind.name();
        match self.kind {
            OpKind::Barrier => write!(f, "barrier()"),
            OpKind::Broadcast => write!(
                f,
                "{name}({} x {}, root {})",
                self.dtype, self.count, self.root
            ),
            OpKind::Reduce => write!(
                f,
                "{name}({} x {}, {}, root {})",
                self.dtype,
                self.count,
                self.op.map_or("?", ReduceOp::name),
                self.root
            ),
            OpKind::Allgather => write!(f, "{name}({} x {} per rank)", self.dtype, self.count),
            OpKind::Send => write!(
                f,
                "send({} x {} to rank {})",
                self.dtype, self.count, self.root
            ),
            OpKind::Allreduce | OpKind::ReduceScatter => {
                write!(
                    f,
                    "{name}({} x {}, {})",
                    self.dtype,
                    self.count,
                    self.op.map_or("?", ReduceOp::name)
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_display() {
        let h = OpHeader {
            seq: 57,
            kind: OpKind::Broadcast,
            dtype: DType::F32,
            op: None,
            root: 0,
            count: 10,
        };
        let back = OpHeader::decode(&h.encode()).unwrap();
        assert_eq!(back, h);
        assert_eq!(h.to_string(), "broadcast(f32 x 10, root 0)");
        let a = OpHeader {
            kind: OpKind::Allreduce,
            op: Some(ReduceOp::Sum),
            count: 12,
            ..h
        };
        assert_eq!(a.to_string(), "allreduce(f32 x 12, sum)");
        assert!(!a.same_call(&h));
        let mut bad = h.encode();
        bad[0] = b'X';
        assert!(OpHeader::decode(&bad).is_err());
        bad = h.encode();
        bad[5] = 99;
        assert!(
            OpHeader::decode(&bad)
                .unwrap_err()
                .to_string()
                .contains("dtype")
        );
    }

    #[test]
    fn hello_round_trip_and_refusals() {
        let v = encode_hello(3, group_id("default"), "secret-token");
        let fixed: [u8; HELLO_FIXED] = v[..HELLO_FIXED].try_into().unwrap();
        let h = decode_hello(&fixed).unwrap();
        assert_eq!((h.rank, h.group, h.token_len), (3, group_id("default"), 12));
        assert_eq!(&v[HELLO_FIXED..], b"secret-token");
        let mut bad = fixed;
        bad[0] = b'G';
        assert!(decode_hello(&bad).is_err());
        let mut old = fixed;
        old[4] = 9;
        assert!(matches!(decode_hello(&old), Err(FrameError::Version(_))));
        assert_ne!(group_id("a"), group_id("b"));
    }
}
