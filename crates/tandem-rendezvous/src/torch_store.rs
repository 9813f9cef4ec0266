//! A client of PyTorch's `TCPStore`, the key-value store torchrun's agent hosts on
//! `MASTER_ADDR:MASTER_PORT` for the whole job.
//!
//! Why: under torchrun that port is taken (binding it fails with "Address already in use"), so
//! Tandem cannot host its own rendezvous there. Instead rank 0 hosts it on an ephemeral port and
//! publishes the address in torch's store, where the other ranks read it: the same two variables
//! are enough, and no second port has to be agreed on. Only the few requests that needs are spoken
//! (validate, set, wait, get, add), each with a deadline; every length the server sends is bounded.
//!
//! The wire format (c10d's `TCPStoreBackend`): a request is a one-byte query type followed by its
//! arguments; a string or byte value is a native-endian `u64` length and the bytes; the first
//! request on a connection is `VALIDATE` with a magic number.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use tandem_core::{Error, Result};

/// c10d's magic number for a client's first request.
const VALIDATION_MAGIC: u32 = 0x3C85_F7CE;

/// Query types, in c10d's order.
#[derive(Clone, Copy, Debug)]
#[repr(u8)]
enum Query {
    /// Checks the store's protocol version.
    Validate = 0,
    /// Sets a key.
    Set = 1,
    /// Gets a key.
    Get = 3,
    /// Adds to a counter.
    Add = 4,
    /// Waits for keys.
    Wait = 6,
}

/// The answer to `WAIT` once every key exists.
const STOP_WAITING: u8 = 0;

/// The longest value this client accepts from the server (its own records are a few hundred
/// bytes; a longer one means the server is not what it should be).
pub const MAX_VALUE: u64 = 1 << 20;

/// A connection to a torch `TCPStore`.
#[derive(Debug)]
pub struct TorchStore {
    /// The connection.
    stream: TcpStream,
    /// The store's address, for errors.
    addr: String,
}

impl TorchStore {
    /// Connects to the store at `addr` (`host:port`), retrying refused connections until
    /// `deadline` (the agent may still be starting), and validates the connection.
    pub fn connect(addr: &str, deadline: Duration) -> Result<TorchStore> {
        let start = Instant::now();
        let mut last = None;
        loop {
            let left = deadline.saturating_sub(start.elapsed());
            if left.is_zero() {
                let why = last.map_or_else(String::new, |e: std::io::Error| format!(": {e}"));
                return Err(Error::timeout(
                    format!("connecting to torch's store at {addr}{why}"),
                    deadline,
                ));
            }
            let target = addr
                .to_socket_addrs()
                .map_err(|e| Error::io(format!("resolving torch's store address {addr}"), e))?
                .next()
                .ok_or_else(|| {
                    Error::config("MASTER_ADDR", format!("{addr} resolves to nothing"))
                })?;
            match TcpStream::connect_timeout(&target, left.min(Duration::from_secs(2))) {
                Ok(stream) => {
                    stream
                        .set_nodelay(true)
                        .map_err(|e| Error::io("setting TCP_NODELAY on torch's store", e))?;
                    let mut store = TorchStore {
                        stream,
                        addr: addr.to_string(),
                    };
                    store.set_deadline(left)?;
                    let mut msg = vec![Query::Validate as u8];
                    msg.extend_from_slice(&VALIDATION_MAGIC.to_ne_bytes());
                    store.send(&msg, "validating the connection")?;
                    return Ok(store);
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(50).min(left));
        }
    }

    /// Stores `value` under `key` (replacing any).
    pub fn set(&mut self, key: &str, value: &[u8], deadline: Duration) -> Result<()> {
        self.set_deadline(deadline)?;
        let mut msg = vec![Query::Set as u8];
        put_bytes(&mut msg, key.as_bytes());
        put_bytes(&mut msg, value);
        self.send(&msg, &format!("setting {key}"))
    }

    /// Waits until `key` exists (up to `deadline`), then returns its value.
    pub fn get(&mut self, key: &str, deadline: Duration) -> Result<Vec<u8>> {
        self.set_deadline(deadline)?;
        let mut msg = vec![Query::Wait as u8];
        msg.extend_from_slice(&1u64.to_ne_bytes());
        put_bytes(&mut msg, key.as_bytes());
        let what = format!("waiting for {key}");
        self.send(&msg, &what)?;
        let mut answer = [0u8; 1];
        self.recv(&mut answer, &what, deadline)?;
        if answer[0] != STOP_WAITING {
            return Err(self.protocol(format!(
                "answered {} to a wait for {key} (expected {STOP_WAITING})",
                answer[0]
            )));
        }
        let mut msg = vec![Query::Get as u8];
        put_bytes(&mut msg, key.as_bytes());
        let what = format!("reading {key}");
        self.send(&msg, &what)?;
        let mut len = [0u8; 8];
        self.recv(&mut len, &what, deadline)?;
        let len = u64::from_ne_bytes(len);
        if len > MAX_VALUE {
            return Err(self.protocol(format!(
                "sent a value of {len} bytes for {key} (at most {MAX_VALUE} expected)"
            )));
        }
        let mut value = vec![0u8; len as usize];
        self.recv(&mut value, &what, deadline)?;
        Ok(value)
    }

    /// Adds `delta` to the counter `key` (created at 0) and returns its new value.
    pub fn add(&mut self, key: &str, delta: i64, deadline: Duration) -> Result<i64> {
        self.set_deadline(deadline)?;
        let mut msg = vec![Query::Add as u8];
        put_bytes(&mut msg, key.as_bytes());
        msg.extend_from_slice(&delta.to_ne_bytes());
        let what = format!("adding to {key}");
        self.send(&msg, &what)?;
        let mut value = [0u8; 8];
        self.recv(&mut value, &what, deadline)?;
        Ok(i64::from_ne_bytes(value))
    }

    /// Bounds the next reads and writes of the connection by `deadline`.
    fn set_deadline(&self, deadline: Duration) -> Result<()> {
        let d = Some(deadline.max(Duration::from_millis(1)));
        self.stream
            .set_read_timeout(d)
            .and_then(|()| self.stream.set_write_timeout(d))
            .map_err(|e| Error::io("setting a deadline on torch's store connection", e))
    }

    /// Writes one message of the store's protocol; `what` names the call in errors.
    fn send(&mut self, msg: &[u8], what: &str) -> Result<()> {
        self.stream
            .write_all(msg)
            .map_err(|e| Error::io(format!("{what} in torch's store at {}", self.addr), e))
    }

    /// Reads exactly `buf.len()` bytes of an answer within `deadline`.
    fn recv(&mut self, buf: &mut [u8], what: &str, deadline: Duration) -> Result<()> {
        self.stream.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Error::timeout(
                format!("{what} in torch's store at {}", self.addr),
                deadline,
            ),
            _ => Error::io(format!("{what} in torch's store at {}", self.addr), e),
        })
    }

    /// An answer that breaks the store's protocol, naming the store.
    fn protocol(&self, problem: String) -> Error {
        Error::transport(format!("torch's store at {}", self.addr), problem)
    }
}

/// Appends `bytes` as the protocol frames them: their length, then the bytes.
fn put_bytes(msg: &mut Vec<u8>, bytes: &[u8]) {
    msg.extend_from_slice(&(bytes.len() as u64).to_ne_bytes());
    msg.extend_from_slice(bytes);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A server that reads one validate request and one request's first bytes, then answers
    /// `answer` (raw bytes), the way a broken or hostile store would.
    fn store_answering(answer: Vec<u8>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut validate = [0u8; 5];
                let _ = s.read_exact(&mut validate);
                assert_eq!(validate[0], Query::Validate as u8);
                assert_eq!(&validate[1..], &VALIDATION_MAGIC.to_ne_bytes());
                let mut head = [0u8; 1];
                let _ = s.read_exact(&mut head);
                let _ = s.write_all(&answer);
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        addr
    }

    #[test]
    fn a_store_nobody_serves_is_a_timeout_naming_its_address() {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").to_string()
        };
        let e = TorchStore::connect(&addr, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
        assert!(e.to_string().contains(&addr), "{e}");
    }

    #[test]
    fn a_value_longer_than_the_bound_is_refused_and_one_at_it_is_read() {
        // WAIT answered with STOP_WAITING, then GET answered with a length past the bound.
        let mut answer = vec![STOP_WAITING];
        answer.extend_from_slice(&(MAX_VALUE + 1).to_ne_bytes());
        let addr = store_answering(answer);
        let mut s = TorchStore::connect(&addr, Duration::from_secs(5)).expect("connect");
        let e = s.get("k", Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");

        // A record's few bytes are read.
        let mut answer = vec![STOP_WAITING];
        answer.extend_from_slice(&3u64.to_ne_bytes());
        answer.extend_from_slice(b"abc");
        let addr = store_answering(answer);
        let mut s = TorchStore::connect(&addr, Duration::from_secs(5)).expect("connect");
        assert_eq!(s.get("k", Duration::from_secs(5)).expect("get"), b"abc");

        // A value of exactly the bound is read whole.
        let mut answer = vec![STOP_WAITING];
        answer.extend_from_slice(&MAX_VALUE.to_ne_bytes());
        answer.extend(std::iter::repeat_n(7u8, MAX_VALUE as usize));
        let addr = store_answering(answer);
        let mut s = TorchStore::connect(&addr, Duration::from_secs(5)).expect("connect");
        let value = s.get("k", Duration::from_secs(5)).expect("get");
        assert_eq!(value.len() as u64, MAX_VALUE);
        assert!(value.iter().all(|&b| b == 7));
    }

    #[test]
    fn a_wait_answered_otherwise_and_a_silent_store_are_errors() {
        let addr = store_answering(vec![7]);
        let mut s = TorchStore::connect(&addr, Duration::from_secs(5)).expect("connect");
        let e = s.get("k", Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("answered 7"), "{e}");

        let addr = store_answering(vec![]);
        let mut s = TorchStore::connect(&addr, Duration::from_secs(5)).expect("connect");
        let e = s.get("k", Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
    }

    /// A store that accepts one connection and returns every byte it received.
    pub(crate) fn recording_store() -> (String, std::thread::JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            got
        });
        (addr, server)
    }

    /// `key` and `value` as a SET request after the validation.
    pub(crate) fn set_request(key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut want = vec![Query::Validate as u8];
        want.extend_from_slice(&VALIDATION_MAGIC.to_ne_bytes());
        want.push(Query::Set as u8);
        put_bytes(&mut want, key);
        put_bytes(&mut want, value);
        want
    }

    #[test]
    fn set_sends_the_key_and_the_value() {
        let (addr, server) = recording_store();
        let mut s = TorchStore::connect(&addr, Duration::from_secs(5)).expect("connect");
        s.set("tandem/k", b"v1", Duration::from_secs(5))
            .expect("set");
        drop(s);
        assert_eq!(
            server.join().expect("server"),
            set_request(b"tandem/k", b"v1")
        );
    }

    #[test]
    fn add_sends_the_key_and_delta_and_reads_the_new_value() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            let mut buf = [0u8; 5 + 1 + 8 + 3 + 8];
            s.read_exact(&mut buf).expect("read");
            assert_eq!(buf[5], Query::Add as u8);
            assert_eq!(&buf[6..14], &3u64.to_ne_bytes());
            assert_eq!(&buf[14..17], b"ctr");
            let delta = i64::from_ne_bytes(buf[17..25].try_into().expect("8 bytes"));
            s.write_all(&(40 + delta).to_ne_bytes()).expect("write");
        });
        let mut s = TorchStore::connect(&addr, Duration::from_secs(5)).expect("connect");
        assert_eq!(s.add("ctr", 2, Duration::from_secs(5)).expect("add"), 42);
        server.join().expect("server");
    }
}
