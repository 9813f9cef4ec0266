//! A push's chunks decoded as they arrive ([`crate::wire`]): half-precision chunks widened to
//! f32, top-k partitions expanded into dense pieces, so every later stage reads plain f32 chunks
//! whatever the worker's compression (the bytes received are counted here, as they crossed the
//! wire); and the check at declaration that workers and server agree on the compression.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tandem_core::compression::Compression;
use tonic::{Code, Status};

use crate::failure::{invalid, status};
use crate::pb::{self, Reason, Wire};
use crate::server::model::Model;
use crate::wire::{SparsePieces, decode_dense};

/// A push's chunks, as the rest of the server reads them (f32 only).
pub(super) type Chunks = Pin<Box<dyn Stream<Item = Result<pb::PushChunk, Status>> + Send>>;

/// Elements per dense piece a top-k partition is read back in.
const SPARSE_PIECE: usize = 1 << 18;

/// `stream` with every chunk decoded to f32 (top-k partitions of `model` expanded lazily, one piece
/// at a time).
pub(super) fn decoded(
    model: Arc<Model>,
    stream: impl Stream<Item = Result<pb::PushChunk, Status>> + Send + 'static,
) -> Chunks {
    Box::pin(stream.flat_map(move |chunk| {
        let pieces: Box<dyn Iterator<Item = Result<pb::PushChunk, Status>> + Send> = match chunk {
            Err(st) => Box::new(std::iter::once(Err(st))),
            Ok(c) => {
                // What crossed the wire, before decoding.
                let n = c.data.len() as u64;
                model.counters.bytes_in.fetch_add(n, Ordering::Relaxed);
                decode(&model, c)
            }
        };
        futures::stream::iter(pieces)
    }))
}

/// One chunk as f32 chunks: itself when it is f32, widened when half, expanded when top-k.
fn decode(
    model: &Model,
    c: pb::PushChunk,
) -> Box<dyn Iterator<Item = Result<pb::PushChunk, Status>> + Send> {
    let bad = |c: &pb::PushChunk, why: String| {
        invalid(format!(
            "{:?} partition {}: {why}; nothing of it applied",
            c.param, c.part
        ))
    };
    match c.wire() {
        Wire::F32 => Box::new(std::iter::once(Ok(c))),
        wire @ (Wire::Bf16 | Wire::Fp16) => {
            let r = decode_dense(&c.data, c.offset, wire).map(|(data, offset)| pb::PushChunk {
                data,
                offset,
                wire: Wire::F32.into(),
                ..c.clone()
            });
            Box::new(std::iter::once(r.map_err(|why| bad(&c, why))))
        }
        Wire::Topk => {
            let key = (c.param.clone(), c.part);
            let Some(numel) = model.parts.get(&key).map(|p| p.numel) else {
                let e = status(
                    Code::NotFound,
                    Reason::UnknownPartition,
                    format!("{:?} partition {} is not held here", c.param, c.part),
                );
                return Box::new(std::iter::once(Err(e)));
            };
            if c.offset != 0 {
                let why = format!("a top-k chunk starts at byte 0, not {}", c.offset);
                return Box::new(std::iter::once(Err(bad(&c, why))));
            }
            let header = pb::PushChunk {
                data: Bytes::new(),
                wire: Wire::F32.into(),
                ..c.clone()
            };
            match SparsePieces::new(c.data.clone(), numel, SPARSE_PIECE) {
                Err(why) => Box::new(std::iter::once(Err(bad(&c, why)))),
                Ok(pieces) => Box::new(pieces.map(move |p| {
                    p.map(|(offset, values)| pb::PushChunk {
                        offset,
                        data: Bytes::from(bytemuck::cast_slice::<f32, u8>(&values).to_vec()),
                        ..header.clone()
                    })
                    .map_err(|why| {
                        invalid(format!(
                            "{:?} partition {}: {why}; the push stops there",
                            header.param, header.part
                        ))
                    })
                })),
            }
        }
    }
}

/// The compression a worker declares against this server's (`server`): accepted when they are
/// the same or either is `auto`; otherwise refused naming both. Returns what the server answers.
pub(super) fn agree(server: Compression, declared: &str) -> Result<Compression, Status> {
    let worker = Compression::parse(declared).map_err(|e| {
        invalid(format!(
            "the declared compression {declared:?} cannot be read: {e}"
        ))
    })?;
    if server == Compression::Auto || worker == Compression::Auto || server == worker {
        return Ok(server);
    }
    Err(status(
        Code::FailedPrecondition,
        Reason::DeclarationMismatch,
        format!(
            "a worker declares compression {worker} but this server was started with {server}; start every worker and server with the same TANDEM_COMPRESSION (or auto on the servers)"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_and_servers_agree_on_the_same_setting_or_auto_and_are_refused_otherwise() {
        let (none, bf16, auto) = (Compression::None, Compression::Bf16, Compression::Auto);
        assert_eq!(agree(bf16, "bf16").expect("same"), bf16);
        assert_eq!(agree(none, "").expect("unset is none"), none);
        assert_eq!(agree(auto, "bf16").expect("auto server"), auto);
        assert_eq!(agree(bf16, "auto").expect("auto worker"), bf16);
        let e = agree(none, "bf16").expect_err("mismatch");
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(
            e.message().contains("bf16") && e.message().contains("started with none"),
            "{}",
            e.message()
        );
        let e = agree(bf16, "topk:0.01").expect_err("mismatch");
        assert!(e.message().contains("topk:0.01"), "{}", e.message());
        assert_eq!(
            agree(none, "zip").expect_err("bad").code(),
            Code::InvalidArgument
        );
    }
}
