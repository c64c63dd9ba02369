//! The patched rumqttc (`third_party/rumqttc`, ROOST-PATCH.md): with
//! `MqttOptions::set_max_request_batch` the event loop writes the requests already queued
//! in one flush. Against a real mosquitto: every queued publish arrives, in order, and is
//! acknowledged; and a broker that stops reading (SIGSTOP) is noticed by the flush timeout
//! instead of hanging the event loop, because a batch stops at a full write buffer.
//!
//! Needs Debian's mosquitto (installed by .ci/run): under CI (`CI=true`) its absence fails
//! the tests; elsewhere they are skipped.

use std::net::SocketAddr;
use std::time::Duration;

use roost_tests::fixtures::{mosquitto_bin, spawn_mosquitto};
use roost_tests::harness;
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Outgoing, Packet, QoS};

const TOPIC: &str = "roost-test/batch";

/// A mosquitto on a free port, without persistence, with room for every queued message.
fn mosquitto(bin: &str, dir: &std::path::Path) -> (std::process::Child, SocketAddr) {
    let port = roost_broker::free_port().expect("port");
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_queued_messages 100000\n"
        ),
    )
    .expect("conf");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    (spawn_mosquitto(bin, &conf, addr), addr)
}

fn options(id: &str, addr: SocketAddr) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1024 * 1024, 1024 * 1024);
    o
}

/// Polls until the CONNACK.
async fn connected(ev: &mut rumqttc::EventLoop) {
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = ev.poll().await.expect("connect") {
            return;
        }
    }
}

/// Sends `signal` (`STOP`, `CONT`) to a child process.
fn signal(child: &std::process::Child, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_writes_deliver_every_queued_publish_in_order_and_acknowledged() {
    const TEST: &str = "batched_writes_deliver_every_queued_publish_in_order_and_acknowledged";
    const N: usize = 5_000;
    harness::init();
    let Some(bin) = mosquitto_bin(TEST) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let (mut broker, addr) = mosquitto(bin, dir.path());

    // The receiver: plain rumqttc (no batching), subscribed before anything is published.
    let (sub, mut sub_ev) = AsyncClient::new(options("batch-sub", addr), 64);
    sub.subscribe(TOPIC, QoS::AtLeastOnce).await.expect("sub");
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = sub_ev.poll().await.expect("subscribe") {
            break;
        }
    }
    let received = tokio::spawn(async move {
        let mut got: Vec<u64> = Vec::with_capacity(N);
        while got.len() < N {
            if let Event::Incoming(Packet::Publish(p)) = sub_ev.poll().await.expect("receive") {
                let text = std::str::from_utf8(&p.payload).expect("utf-8");
                got.push(text.parse().expect("number"));
            }
        }
        got
    });

    // The sender: every publish is queued before its event loop runs, so the loop finds
    // them waiting and writes them in batches of up to 100, under an in-flight window of
    // 200 (flow control stops a batch too).
    let mut opts = options("batch-pub", addr);
    opts.set_max_request_batch(100);
    opts.set_inflight(200);
    let (publisher, mut ev) = AsyncClient::new(opts, N);
    for i in 0..N {
        publisher
            .publish(TOPIC, QoS::AtLeastOnce, false, i.to_string().into_bytes())
            .await
            .expect("queue");
    }
    let (mut sent, mut acked) = (0usize, 0usize);
    while acked < N {
        match ev.poll().await.expect("event loop") {
            Event::Outgoing(Outgoing::Publish(_)) => sent += 1,
            Event::Incoming(Packet::PubAck(_)) => acked += 1,
            _ => {}
        }
    }
    assert_eq!(sent, N, "one outgoing event per publish");

    let got = received.await.expect("receiver");
    let want: Vec<u64> = (0..N as u64).collect();
    assert_eq!(got, want, "every publish arrived once, in order");
    let _ = broker.kill();
    let _ = broker.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_reading_is_noticed_by_the_flush_timeout() {
    const TEST: &str = "a_broker_that_stops_reading_is_noticed_by_the_flush_timeout";
    harness::init();
    let Some(bin) = mosquitto_bin(TEST) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let (mut broker, addr) = mosquitto(bin, dir.path());
    let mut opts = options("batch-stall", addr);
    opts.set_max_request_batch(1000);
    opts.set_inflight(1000);
    let (publisher, mut ev) = AsyncClient::new(opts, 1000);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_connection_timeout(1);
    ev.set_network_options(net);
    connected(&mut ev).await;

    // The broker stops reading; more is queued than the socket buffers on both ends hold
    // (256 × 64 KiB = 16 MiB), all of it waiting at once for one batch.
    signal(&broker, "STOP");
    for _ in 0..256 {
        publisher
            .publish(TOPIC, QoS::AtLeastOnce, false, vec![b'x'; 64 * 1024])
            .await
            .expect("queue");
    }
    // Without the stop at a full write buffer the batch's own writes would wait for the
    // broker, with no timeout: this loop would never end. The guard only turns such a hang
    // into a failure.
    let outcome = tokio::time::timeout(Duration::from_secs(300), async {
        loop {
            if let Err(e) = ev.poll().await {
                break e;
            }
        }
    })
    .await;
    signal(&broker, "CONT");
    let _ = broker.kill();
    let _ = broker.wait();
    let error = outcome.expect("the event loop hung on a broker that stopped reading");
    assert!(
        matches!(error, ConnectionError::FlushTimeout),
        "the flush timed out, got {error:?}"
    );
}

/// The same option in the patched v5 client: queued publishes written in batches all arrive,
/// in order, and are acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_batched_writes_deliver_every_queued_publish_in_order_and_acknowledged() {
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::{AsyncClient as Client5, Event as E5, MqttOptions as Options5};
    const TEST: &str = "v5_batched_writes_deliver_every_queued_publish_in_order_and_acknowledged";
    const N: usize = 5_000;
    harness::init();
    let Some(bin) = mosquitto_bin(TEST) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let (mut broker, addr) = mosquitto(bin, dir.path());
    let options5 = |id: &str| {
        let mut o = Options5::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    };

    let (sub, mut sub_ev) = Client5::new(options5("batch-sub-5"), 64);
    sub.subscribe(TOPIC, Q5::AtLeastOnce).await.expect("sub");
    loop {
        if let E5::Incoming(P5::SubAck(_)) = sub_ev.poll().await.expect("subscribe") {
            break;
        }
    }
    let received = tokio::spawn(async move {
        let mut got: Vec<u64> = Vec::with_capacity(N);
        while got.len() < N {
            if let E5::Incoming(P5::Publish(p)) = sub_ev.poll().await.expect("receive") {
                let text = std::str::from_utf8(&p.payload).expect("utf-8");
                got.push(text.parse().expect("number"));
            }
        }
        got
    });

    let mut opts = options5("batch-pub-5");
    opts.set_max_request_batch(100);
    let (publisher, mut ev) = Client5::new(opts, N);
    for i in 0..N {
        publisher
            .publish(TOPIC, Q5::AtLeastOnce, false, i.to_string().into_bytes())
            .await
            .expect("queue");
    }
    let (mut sent, mut acked) = (0usize, 0usize);
    while acked < N {
        match ev.poll().await.expect("event loop") {
            E5::Outgoing(rumqttc::Outgoing::Publish(_)) => sent += 1,
            E5::Incoming(P5::PubAck(_)) => acked += 1,
            _ => {}
        }
    }
    assert_eq!(sent, N, "one outgoing event per publish");
    let got = received.await.expect("receiver");
    let want: Vec<u64> = (0..N as u64).collect();
    assert_eq!(got, want, "every publish arrived once, in order");
    let _ = broker.kill();
    let _ = broker.wait();
}
