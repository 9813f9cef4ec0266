//! Moving bytes between ranks over TCP: the wire formats ([`frame`]) and the authenticated full mesh
//! of connections ([`mesh`]). Sockets only move frames; what to move is decided in `algorithm`.

pub mod congestion;
pub mod frame;
pub mod mesh;
pub use tandem_peer_memory as peer_memory;
