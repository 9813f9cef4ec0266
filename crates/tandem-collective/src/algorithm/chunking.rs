//! Cutting a buffer into balanced parts and parts into pipeline segments.

use std::ops::Range;

/// Splits `len` elements into `parts` contiguous ranges whose sizes differ by at most one; the first
/// `len % parts` ranges are one longer. Every length works, including 0 and lengths below `parts`.
///
/// ```
/// use tandem_collective::algorithm::chunking::partition;
/// assert_eq!(partition(10, 3), vec![0..4, 4..7, 7..10]);
/// assert_eq!(partition(1, 3), vec![0..1, 1..1, 1..1]);
/// ```
pub fn partition(len: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.max(1);
    let base = len / parts;
    let extra = len % parts;
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let size = base + usize::from(i < extra);
            let r = start..start + size;
            start += size;
            r
        })
        .collect()
}

/// Cuts `range` into consecutive segments of at most `segment` elements (at least one element each;
/// an empty range gives no segments).
///
/// ```
/// use tandem_collective::algorithm::chunking::segments;
/// assert_eq!(segments(10..25, 6), vec![10..16, 16..22, 22..25]);
/// ```
pub fn segments(range: Range<usize>, segment: usize) -> Vec<Range<usize>> {
    let segment = segment.max(1);
    let mut out = Vec::with_capacity(range.len().div_ceil(segment));
    let mut start = range.start;
    while start < range.end {
        let end = (start + segment).min(range.end);
        out.push(start..end);
        start = end;
    }
    out
}

/// Scales an element range to a byte range for elements of `size` bytes.
pub fn bytes(range: &Range<usize>, size: usize) -> Range<usize> {
    range.start * size..range.end * size
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_covers_everything_once_and_balances() {
        for len in [0usize, 1, 2, 3, 7, 64, 1000, 1001] {
            for parts in 1..=7 {
                let p = partition(len, parts);
                assert_eq!(p.len(), parts);
                assert_eq!(p[0].start, 0);
                assert_eq!(p[parts - 1].end, len);
                for w in p.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let sizes: Vec<usize> = p.iter().map(|r| r.len()).collect();
                let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(max - min <= 1, "{len}/{parts}: {sizes:?}");
            }
        }
        assert_eq!(partition(5, 0), vec![0..5]);
    }

    #[test]
    fn segments_cover_the_range() {
        assert!(segments(3..3, 4).is_empty());
        assert_eq!(segments(0..4, 4), vec![0..4]);
        assert_eq!(segments(0..5, 0), vec![0..1, 1..2, 2..3, 3..4, 4..5]);
        let s = segments(7..1007, 64);
        assert_eq!(s.iter().map(|r| r.len()).sum::<usize>(), 1000);
        assert_eq!(bytes(&(2..5), 4), 8..20);
    }
}
