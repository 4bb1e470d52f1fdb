//! Property tests of what faces the network: the frame decoder and a whole
//! client session fed arbitrary bytes. They must never panic, never hang
//! once the peer is gone, and never allocate beyond what arrived (plus a
//! bounded reserve), whatever length a peer announces.
//!
//! `scripts/test.sh` runs a bounded number of cases; `scripts/fuzz` runs
//! many more (`PROPTEST_CASES`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use ppserver::config::Config;
use ppserver::front::session::{serve_stream, SessionContext};
use ppserver::jobs::scheduler::Scheduler;
use ppserver::ops::stats::Stats;
use ppserver::protocol::auth;
use ppserver::protocol::wire::{
    decode, encode_frame as framed, write_frame, Decoded, FrameReader, HEADER_LEN,
};

fn context(max_frame: usize) -> SessionContext {
    context_from(Config {
        max_frame_size: max_frame,
        ..Config::default()
    })
}

/// The context of a server with `cfg`, secret `s` and 2 workers.
fn context_from(cfg: Config) -> SessionContext {
    let cfg = Config {
        secret: "s".into(),
        workers: 2,
        ..cfg
    };
    // No workers serve this scheduler: jobs stay queued, and the session
    // must still end when its peer goes away.
    SessionContext::new(
        &cfg,
        "1.7.8".into(),
        Arc::new(Scheduler::default()),
        Arc::new(Stats::default()),
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs a session over an in-memory pipe: `script` plays the client with
/// the client end, then the client end is closed; the session must end
/// within a bound. Returns everything the server sent.
fn run_session<F, Fut>(max_frame: usize, script: F) -> Vec<u8>
where
    F: FnOnce(tokio::io::DuplexStream) -> Fut,
    Fut: std::future::Future<Output = tokio::io::DuplexStream>,
{
    run_session_in(context(max_frame), script)
}

/// [`run_session`] with the server's state `ctx`, the peer at 127.0.0.1.
fn run_session_in<F, Fut>(ctx: SessionContext, script: F) -> Vec<u8>
where
    F: FnOnce(tokio::io::DuplexStream) -> Fut,
    Fut: std::future::Future<Output = tokio::io::DuplexStream>,
{
    runtime().block_on(async {
        let (client, server) = tokio::io::duplex(1 << 16);
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let session = async { serve_stream(server, peer, &ctx).await };
        let client_side = async {
            let mut client = script(client).await;
            client.shutdown().await.ok();
            let mut seen = Vec::new();
            let _ = client.read_to_end(&mut seen).await;
            seen
        };
        let (_, seen) = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(session, client_side)
        })
        .await
        .expect("session ended after its peer closed");
        seen
    })
}

/// Completes the handshake as a client with secret `s`.
async fn authenticate(c: &mut tokio::io::DuplexStream, kind: &[u8]) {
    // One reader for the whole exchange: it may buffer past a frame.
    let mut r = FrameReader::new(c, 1 << 20);
    assert_eq!(r.read_frame().await.unwrap().unwrap(), &b"1.7.8"[..]);
    let nonce = r.read_frame().await.unwrap().unwrap();
    let answer = auth::expected_answer(&nonce, b"s");
    write_frame(r.get_mut(), &answer).await.unwrap();
    assert_eq!(r.read_frame().await.unwrap().unwrap(), &b"OK"[..]);
    write_frame(r.get_mut(), kind).await.unwrap();
}

proptest! {
    #[test]
    fn decoder_never_panics_and_consumes_whole_frames(
        input in proptest::collection::vec(any::<u8>(), 0..512),
        max in 0usize..256,
    ) {
        let mut buf = BytesMut::from(&input[..]);
        let mut consumed = Vec::new();
        loop {
            match decode(&mut buf, max) {
                Ok(Decoded::Frame(f)) => {
                    prop_assert!(f.len() <= max);
                    consumed.extend(framed(&f));
                }
                Ok(Decoded::Incomplete { missing }) => {
                    prop_assert!(missing > 0);
                    break;
                }
                Err(_) => break,
            }
        }
        // What came out, re-framed, is exactly the front of the input.
        prop_assert_eq!(&input[..consumed.len()], &consumed[..]);
        prop_assert_eq!(buf.len(), input.len() - consumed.len());
    }

    #[test]
    fn reader_yields_the_frames_whatever_the_read_sizes(
        frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
        chunk in 1usize..64,
    ) {
        let bytes: Vec<u8> = frames.iter().flat_map(|f| framed(f)).collect();
        let got = runtime().block_on(async {
            let (mut a, b) = tokio::io::duplex(chunk);
            let writer = tokio::spawn(async move {
                for c in bytes.chunks(chunk) {
                    a.write_all(c).await.unwrap();
                }
            });
            let mut r = FrameReader::new(b, 300);
            let mut got = Vec::new();
            while let Some(f) = r.read_frame().await.unwrap() {
                got.push(f.to_vec());
            }
            writer.await.unwrap();
            got
        });
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn unauthenticated_garbage_ends_the_session(
        input in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let seen = run_session(1 << 20, |mut c| async move {
            let _ = c.write_all(&input).await;
            c
        });
        // Whatever was sent, the server said at most: version, nonce, and
        // FAILED (a random answer never matches).
        let mut buf = BytesMut::from(&seen[..]);
        let mut frames = Vec::new();
        while let Ok(Decoded::Frame(f)) = decode(&mut buf, 1 << 20) {
            frames.push(f.to_vec());
        }
        prop_assert_eq!(&frames[0], b"1.7.8");
        prop_assert!(frames.len() <= 3, "{:?}", frames);
        if frames.len() == 3 {
            prop_assert_eq!(&frames[2], b"FAILED");
        }
    }

    /// From a --proxy-protocol address: a header (maybe whole, maybe
    /// cut, maybe bent) and anything after it end the session too, and
    /// the server says no more than to any other peer.
    #[test]
    fn a_proxys_garbage_ends_the_session(
        header in prop_oneof![
            Just(b"PROXY TCP4 192.0.2.7 127.0.0.1 56324 60000\r\n".to_vec()),
            Just(b"\r\n\r\n\0\r\nQUIT\n\x21\x11\0\x0c\xc0\0\x02\x07\x7f\0\0\x01\0\x01\0\x02".to_vec()),
            Just(b"\r\n\r\n\0\r\nQUIT\n\x20\0\0\0".to_vec()),
            Just(Vec::new()),
        ],
        cut in 0usize..64,
        flip in proptest::option::of((0usize..64, any::<u8>())),
        input in proptest::collection::vec(any::<u8>(), 0..1024),
    ) {
        let mut cfg = Config::default();
        cfg.proxy_protocol.extend_from("127.0.0.1").unwrap();
        let mut bytes = header[..header.len().min(cut)].to_vec();
        if let Some((at, b)) = flip {
            if at < bytes.len() {
                bytes[at] = b;
            }
        }
        bytes.extend(&input);
        let seen = run_session_in(context_from(cfg), |mut c| async move {
            let _ = c.write_all(&bytes).await;
            c
        });
        let mut buf = BytesMut::from(&seen[..]);
        let mut frames = Vec::new();
        while let Ok(Decoded::Frame(f)) = decode(&mut buf, 1 << 20) {
            frames.push(f.to_vec());
        }
        prop_assert!(frames.len() <= 3, "{:?}", frames);
        if let Some(first) = frames.first() {
            prop_assert_eq!(first, b"1.7.8");
        }
    }

    #[test]
    fn authenticated_garbage_ends_the_session(
        kind in prop_oneof![Just(b"EXEC".to_vec()), Just(b"STAT".to_vec()), proptest::collection::vec(any::<u8>(), 0..8)],
        input in proptest::collection::vec(any::<u8>(), 0..4096),
        header in proptest::option::of(any::<u64>()),
    ) {
        run_session(4096, |mut c| async move {
            authenticate(&mut c, &kind).await;
            // Arbitrary bytes, then maybe a header announcing any length:
            // refused or waited on, never allocated up front.
            let _ = c.write_all(&input).await;
            if let Some(h) = header {
                let _ = c.write_all(&h.to_be_bytes()).await;
            }
            c
        });
    }
}

#[test]
fn a_huge_announced_frame_reserves_little() {
    // 512 MiB announced, 1 MiB sent: the buffer grows with what arrives.
    runtime().block_on(async {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            a.write_all(&(512u64 << 20).to_be_bytes()).await.unwrap();
            a.write_all(&vec![0u8; 1 << 20]).await.unwrap();
        });
        let mut r = FrameReader::new(b, 1 << 30);
        assert!(matches!(
            r.read_frame().await,
            Err(ppserver::protocol::wire::FrameError::Truncated)
        ));
        assert!(
            r.buffered_capacity() <= 4 << 20,
            "{}",
            r.buffered_capacity()
        );
    });
    let _ = HEADER_LEN;
}
