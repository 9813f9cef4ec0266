//! Every rendezvous request handler, fed arbitrary protobufs: the input is a sequence of
//! requests (a byte choosing the method, two bytes of length, the encoded message), applied in
//! order to one store, as a hostile client that holds the token could send them. Waits are cut to
//! a few milliseconds so a request for an hour's wait costs the fuzzer nothing.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;

#[path = "calls.rs"]
mod calls;
use prost::Message;
use tandem_rendezvous::pb::rendezvous_server::Rendezvous;
use tandem_rendezvous::pb::*;
use tandem_rendezvous::store::Store;
use tandem_rendezvous::{Limits, Service};
use tonic::Request;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

const SHORT: u64 = 3;

fuzz_target!(|data: &[u8]| {
    let svc = Service::new(Arc::new(Store::new(Limits::default())));
    runtime().block_on(async {
        for (method, body) in calls::calls(data, 64) {
            match method % 7 {
                0 => {
                    if let Ok(m) = SetRequest::decode(body) {
                        let _ = svc.set(Request::new(m)).await;
                    }
                }
                1 => {
                    if let Ok(m) = GetRequest::decode(body) {
                        let _ = svc.get(Request::new(m)).await;
                    }
                }
                2 => {
                    if let Ok(mut m) = WaitRequest::decode(body) {
                        m.timeout_ms = m.timeout_ms.min(SHORT);
                        let _ = svc.wait(Request::new(m)).await;
                    }
                }
                3 => {
                    if let Ok(m) = AddRequest::decode(body) {
                        let _ = svc.add(Request::new(m)).await;
                    }
                }
                4 => {
                    if let Ok(m) = CompareAndSetRequest::decode(body) {
                        let _ = svc.compare_and_set(Request::new(m)).await;
                    }
                }
                5 => {
                    if let Ok(m) = DeleteRequest::decode(body) {
                        let _ = svc.delete(Request::new(m)).await;
                    }
                }
                _ => {
                    if let Ok(mut m) = BarrierRequest::decode(body) {
                        m.timeout_ms = m.timeout_ms.min(SHORT);
                        let _ = svc.barrier(Request::new(m)).await;
                    }
                }
            }
        }
    });
});
