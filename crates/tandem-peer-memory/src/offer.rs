//! What a reader may read: the regions a peer offered for one operation, while its word holds the
//! operation's tag.

use crate::{PeerMemory, ReadError};

/// The start of a region of `len` bytes a peer offered at `addr`, if the whole region lies in this
/// machine's address space (so `addr + offset` never wraps for any offset below `len`).
///
/// ```
/// assert_eq!(tandem_peer_memory::check_region(0x1000, 64).ok(), Some(0x1000));
/// assert!(tandem_peer_memory::check_region(u64::MAX, 2).is_err());
/// ```
pub fn check_region(addr: u64, len: u64) -> Result<usize, ReadError> {
    usize::try_from(addr)
        .ok()
        .filter(|a| {
            usize::try_from(len)
                .ok()
                .and_then(|l| a.checked_add(l))
                .is_some()
        })
        .ok_or_else(|| {
            ReadError::OutOfBounds(format!(
                "{len} bytes at {addr:#x} are beyond this machine's addresses"
            ))
        })
}

/// Regions of a peer's memory offered for one operation, read only while the peer's word holds
/// the operation's tag.
#[derive(Debug, Clone)]
pub struct Offer {
    peer: PeerMemory,
    word: usize,
    tag: u64,
    regions: Vec<(usize, usize)>,
}

impl Offer {
    /// The offer of `regions` (address, length) by `peer`, whose word at `word` holds `tag` while
    /// the offer stands. Regions that do not fit this machine's addresses are refused.
    pub fn new(
        peer: PeerMemory,
        word: u64,
        tag: u64,
        regions: &[(u64, u64)],
    ) -> Result<Offer, ReadError> {
        let word = check_region(word, 8)?;
        let regions = regions
            .iter()
            .map(|&(addr, len)| Ok((check_region(addr, len)?, len as usize)))
            .collect::<Result<Vec<_>, ReadError>>()?;
        Ok(Offer {
            peer,
            word,
            tag,
            regions,
        })
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether no region was offered.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// The peer.
    pub fn peer(&self) -> PeerMemory {
        self.peer
    }

    /// Copies bytes `offset..offset + dst.len()` of region `region` into `dst`, then checks the
    /// offer still stands (so the bytes are what the peer offered).
    pub fn read(&self, region: usize, offset: usize, dst: &mut [u8]) -> Result<(), ReadError> {
        let (addr, len) = self.regions.get(region).copied().ok_or_else(|| {
            ReadError::OutOfBounds(format!(
                "region {region} was not offered ({} were)",
                self.regions.len()
            ))
        })?;
        if offset.checked_add(dst.len()).is_none_or(|end| end > len) {
            return Err(ReadError::OutOfBounds(format!(
                "bytes {offset}..+{} are outside the {len} bytes of region {region}",
                dst.len()
            )));
        }
        // In bounds: `addr + len` was checked not to wrap.
        self.peer.read(addr + offset, dst)?;
        self.still_offered()
    }

    /// Whether the peer's word still holds the tag.
    pub fn still_offered(&self) -> Result<(), ReadError> {
        if self.peer.read_u64(self.word)? == self.tag {
            Ok(())
        } else {
            Err(ReadError::Withdrawn)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalWord;

    #[test]
    fn regions_must_fit_the_address_space() {
        let top = usize::MAX as u64;
        assert_eq!(check_region(top - 64, 64).ok(), Some(usize::MAX - 64));
        assert!(check_region(top - 63, 64).is_err(), "one byte more wraps");
        assert_eq!(
            check_region(u64::MAX, 0).ok(),
            usize::try_from(u64::MAX).ok()
        );
        let peer = PeerMemory::of_process(1).expect("pid");
        assert!(Offer::new(peer, 8, 1, &[(top - 3, 8)]).is_err());
        assert!(Offer::new(peer, top - 3, 1, &[]).is_err(), "the word too");
    }

    #[test]
    fn only_the_offered_bytes_are_read_and_only_while_offered() {
        let w = LocalWord::new();
        let Some(peer) = PeerMemory::parse(&w.advert()).filter(|p| p.probe().is_ok()) else {
            return;
        };
        let a = [1u8; 32];
        let b = [2u8; 16];
        let lease = w.lease(5);
        let regions = [(a.as_ptr() as u64, 32), (b.as_ptr() as u64, 16)];
        let offer = Offer::new(peer, w.address() as u64, lease.tag(), &regions).expect("offer");
        assert_eq!(offer.len(), 2);
        assert!(!offer.is_empty());
        assert!(
            Offer::new(peer, w.address() as u64, lease.tag(), &[])
                .expect("no regions")
                .is_empty()
        );
        let mut dst = [0u8; 16];
        offer.read(1, 0, &mut dst).expect("whole region 1");
        assert_eq!(dst, b);
        offer
            .read(0, 16, &mut dst)
            .expect("the last 16 bytes of region 0");
        assert_eq!(dst, [1u8; 16]);
        // One byte past a region, or a region never offered: refused, nothing read.
        assert!(matches!(
            offer.read(0, 17, &mut dst),
            Err(ReadError::OutOfBounds(_))
        ));
        assert!(matches!(
            offer.read(1, 1, &mut dst),
            Err(ReadError::OutOfBounds(_))
        ));
        assert!(matches!(
            offer.read(2, 0, &mut dst),
            Err(ReadError::OutOfBounds(_))
        ));
        assert!(matches!(
            offer.read(0, usize::MAX, &mut dst),
            Err(ReadError::OutOfBounds(_))
        ));
        drop(lease);
        let e = offer.read(1, 0, &mut dst).expect_err("withdrawn");
        assert!(matches!(e, ReadError::Withdrawn) && e.peer_left());
    }
}
