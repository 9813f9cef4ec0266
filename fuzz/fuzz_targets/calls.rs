//! How the handler targets read their input: a sequence of calls, each a byte choosing the method,
//! two bytes of length (little-endian) and that many bytes of encoded message (cut at the end).

/// At most `limit` calls of `data`, as (method, message bytes).
pub fn calls(mut data: &[u8], limit: usize) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 3 && out.len() < limit {
        let (method, len) = (data[0], u16::from_le_bytes([data[1], data[2]]) as usize);
        let body = &data[3..];
        let len = len.min(body.len());
        out.push((method, &body[..len]));
        data = &body[len..];
    }
    out
}
