//! Pure algorithms: how buffers are cut, which chunk moves at each ring step, how values combine.
//! Nothing here touches a socket, so everything here is unit-tested directly.

pub mod chunking;
pub mod reduce;
pub mod ring;
