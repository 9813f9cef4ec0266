//! Agreeing on the partition map through the rendezvous.

use std::time::Duration;

use tandem::ps::init::Init;
use tandem::ps::placement::{ParamDecl, agree, place};
use tandem::rendezvous::{Client, Host, JobToken, ServerConfig};

#[test]
fn processes_with_another_map_are_refused() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let token = JobToken::generate();
        let host = Host::bind(
            "127.0.0.1:0",
            ServerConfig::new(token.clone()).with_security(tandem_tests::security()),
        )
        .await
        .expect("bind");
        let addr = host.addr().to_string();
        let params = vec![
            ParamDecl::new("w", &[1000, 10], Init::Zeros),
            ParamDecl::new("b", &[10], Init::Zeros),
        ];
        let map = place(&params, 2, 1024).expect("map");
        let chief = Client::connect_with(
            &addr,
            &token,
            &tandem_tests::security(),
            Duration::from_secs(10),
        )
        .await
        .expect("connect");
        let worker = Client::connect_with(
            &addr,
            &token,
            &tandem_tests::security(),
            Duration::from_secs(10),
        )
        .await
        .expect("connect");
        let waiting = {
            let (worker, map) = (worker.clone(), map.clone());
            tokio::spawn(async move { agree(&worker, &map, false, Duration::from_secs(30)).await })
        };
        agree(&chief, &map, true, Duration::from_secs(30))
            .await
            .expect("the chief decides");
        waiting.await.expect("join").expect("same map agrees");
        // A worker that declared other shapes, or counts other servers, is refused.
        let other = place(&[ParamDecl::new("w", &[1000, 11], Init::Zeros)], 2, 1024).expect("map");
        let e = agree(&worker, &other, false, Duration::from_secs(5))
            .await
            .expect_err("must refuse");
        assert!(e.to_string().contains("partition map"), "{e}");
        let three = place(&params, 3, 1024).expect("map");
        assert!(
            agree(&chief, &three, true, Duration::from_secs(5))
                .await
                .is_err(),
            "a second decision must match the first"
        );
        host.stop().await.expect("stop");
    });
}
