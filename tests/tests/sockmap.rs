//! Kernel suite for the opt-in sk_skb sockmap splice (`--sockmap`, ADR 004) on its own: real loopback connections handed to
//! the stream verdict by the agent's splice code (no pods, no agent process). Bytes arrive
//! in order and complete whether they were queued before the splice or after, end of
//! stream and resets propagate, the agent forwards nothing itself, the counters come from
//! the kernel, a policy cut resets both ends, and sockets the kernel refuses are copied.

use std::{
    future::pending,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_agent::{
    ebpf::{Datapath, Sockmap},
    proxy::sockmap,
    testing::{Cluster, require_root},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const MIB: usize = 1 << 20;

/// The agent's kernel programs loaded for a one-node test cluster (whose teardown removes
/// the pins), and the sockmap they provide.
struct Kernel {
    _cluster: Cluster,
    _datapath: Datapath,
    sockmap: Arc<Sockmap>,
    pin_dir: PathBuf,
}

impl Drop for Kernel {
    fn drop(&mut self) {
        let _ = mesh_agent::ebpf::uninstall(&self.pin_dir);
    }
}

fn kernel() -> Kernel {
    let cluster = Cluster::builder()
        .nodes(1)
        .build()
        .expect("building the test cluster");
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}-splice", cluster.prefix()));
    let datapath =
        Datapath::install(&pin_dir, cluster.node(0).cgroup(), true).expect("loading the programs");
    let sockmap = datapath
        .sockmap()
        .expect("this kernel must accept the splice program");
    Kernel {
        _cluster: cluster,
        _datapath: datapath,
        sockmap,
        pin_dir,
    }
}

/// The four sockets of a proxied same-node connection over loopback: the application
/// client and the agent's accepted socket, the agent's delivery socket and the
/// application server's accepted socket.
struct Conn {
    client: TcpStream,
    agent_down: TcpStream,
    agent_up: TcpStream,
    server: TcpStream,
}

async fn conn() -> Conn {
    let outbound = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(outbound.local_addr().unwrap())
        .await
        .unwrap();
    let (agent_down, _) = outbound.accept().await.unwrap();
    let agent_up = TcpStream::connect(app.local_addr().unwrap()).await.unwrap();
    let (server, _) = app.accept().await.unwrap();
    Conn {
        client,
        agent_down,
        agent_up,
        server,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Splices `agent_down`/`agent_up` in a task that returns the outcome.
fn spawn_splice(
    sockmap: &Arc<Sockmap>,
    agent_down: TcpStream,
    agent_up: TcpStream,
    cancel: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<sockmap::Outcome> {
    let sockmap = sockmap.clone();
    tokio::spawn(async move {
        let spliced = sockmap::start(&sockmap, &agent_down, &agent_up).expect("splice refused");
        spliced.run(&agent_down, &agent_up, cancel).await
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

const DEADLINE: Duration = Duration::from_secs(20);

#[test]
fn spliced_bytes_are_exact_both_ways_with_half_close_and_kernel_counters() {
    if !require_root() {
        return;
    }
    let k = kernel();
    runtime().block_on(async {
        let Conn {
            mut client,
            agent_down,
            agent_up,
            mut server,
        } = conn().await;
        // Bytes queued on both sides before the splice must not wait for more bytes.
        client.write_all(b"early request").await.unwrap();
        server.write_all(b"early banner").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let task = spawn_splice(&k.sockmap, agent_down, agent_up, pending());

        let mut early = [0u8; 13];
        tokio::time::timeout(Duration::from_secs(2), server.read_exact(&mut early))
            .await
            .expect("bytes queued before the splice stalled")
            .unwrap();
        assert_eq!(&early, b"early request");
        let mut banner = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(2), client.read_exact(&mut banner))
            .await
            .expect("bytes queued before the splice stalled")
            .unwrap();
        assert_eq!(&banner, b"early banner");

        // Bulk both ways at once, then the client half-closes: the server must read every
        // byte, then end of stream; then the server closes and the client sees all of its
        // bytes, then end of stream.
        let up = pattern(8 * MIB, 1);
        let down = pattern(6 * MIB, 7);
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let up_sent = up.clone();
        let writer_c = tokio::spawn(async move {
            cw.write_all(&up_sent).await.unwrap();
            cw.shutdown().await.unwrap();
            cw
        });
        let down_sent = down.clone();
        let writer_s = tokio::spawn(async move {
            sw.write_all(&down_sent).await.unwrap();
            sw
        });
        let read_s = tokio::spawn(async move {
            let mut got = Vec::new();
            sr.read_to_end(&mut got).await.unwrap();
            got
        });
        let got_s = match tokio::time::timeout(DEADLINE, read_s)
            .await
            .expect("server never saw the end of stream")
        {
            Ok(got) => got,
            Err(e) => panic!("server read failed ({e}); splice: {:?}", task.await),
        };
        assert!(
            got_s == up,
            "server got {} bytes, not the 8 MiB sent in order",
            got_s.len()
        );
        let mut sw = writer_s.await.unwrap();
        sw.shutdown().await.unwrap();
        let mut got_c = Vec::new();
        tokio::time::timeout(DEADLINE, cr.read_to_end(&mut got_c))
            .await
            .expect("client never saw the end of stream")
            .unwrap();
        assert!(
            got_c == down,
            "client got {} bytes, not the 6 MiB sent in order",
            got_c.len()
        );
        drop(writer_c.await.unwrap());

        let outcome = tokio::time::timeout(DEADLINE, task)
            .await
            .expect("splice did not end after both half-closes")
            .unwrap();
        assert!(outcome.error.is_none(), "{outcome:?}");
        assert_eq!(
            outcome.transferred.downstream_to_upstream,
            (13 + up.len()) as u64
        );
        assert_eq!(
            outcome.transferred.upstream_to_downstream,
            (12 + down.len()) as u64
        );
        assert_eq!(
            outcome.forwarded_by_agent, 0,
            "the kernel, not the agent, must move the bytes"
        );
    });
}

#[test]
fn request_response_turns_do_not_stall_and_a_reset_propagates() {
    if !require_root() {
        return;
    }
    let k = kernel();
    runtime().block_on(async {
        let Conn {
            mut client,
            agent_down,
            agent_up,
            mut server,
        } = conn().await;
        let task = spawn_splice(&k.sockmap, agent_down, agent_up, pending());
        let started = Instant::now();
        for i in 0..200u32 {
            let req = format!("request {i}");
            client.write_all(req.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; req.len()];
            server.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, req.as_bytes());
            let resp = format!("response {i} {}", "x".repeat(1024));
            server.write_all(resp.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; resp.len()];
            client.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, resp.as_bytes());
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "200 turns took {:?}: something waits for a timer",
            started.elapsed()
        );
        // The server resets: the client must see the connection fail, not hang.
        socket2::SockRef::from(&server)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(server);
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("the reset did not reach the client");
        assert!(
            matches!(r, Err(_) | Ok(0)),
            "client read after the server's reset: {r:?}"
        );
        let outcome = tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
        assert!(outcome.error.is_some(), "a reset is an error: {outcome:?}");
    });
}

#[test]
fn a_policy_cut_resets_both_ends_of_a_spliced_connection() {
    if !require_root() {
        return;
    }
    let k = kernel();
    runtime().block_on(async {
        let Conn {
            mut client,
            agent_down,
            agent_up,
            mut server,
        } = conn().await;
        let (cut, cut_rx) = tokio::sync::oneshot::channel::<()>();
        let task = spawn_splice(&k.sockmap, agent_down, agent_up, async move {
            let _ = cut_rx.await;
        });
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        cut.send(()).unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("the cut did not end the splice")
            .unwrap();
        assert!(outcome.error.is_some());
        for (name, s) in [("client", &mut client), ("server", &mut server)] {
            let r = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("{name} still connected after the cut"));
            assert!(r.is_err(), "{name} must see a reset, got {r:?}");
        }
    });
}

#[test]
fn sockets_the_kernel_refuses_are_copied_instead() {
    if !require_root() {
        return;
    }
    let k = kernel();
    runtime().block_on(async {
        // The client already half-closed (the agent's socket is in CLOSE_WAIT): refused
        // before anything entered the map.
        let Conn {
            mut client,
            mut agent_down,
            mut agent_up,
            mut server,
        } = conn().await;
        client.write_all(b"all at once").await.unwrap();
        client.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(sockmap::start(&k.sockmap, &agent_down, &agent_up).is_err());
        let copy = tokio::spawn(async move {
            tokio::io::copy_bidirectional(&mut agent_down, &mut agent_up).await
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"all at once");
        server.write_all(b"reply").await.unwrap();
        drop(server);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"reply");
        copy.await.unwrap().unwrap();

        // The server closed first: the downstream socket already entered the map, so the
        // copy must still see its bytes.
        let Conn {
            mut client,
            mut agent_down,
            mut agent_up,
            mut server,
        } = conn().await;
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(sockmap::start(&k.sockmap, &agent_down, &agent_up).is_err());
        let copy = tokio::spawn(async move {
            tokio::io::copy_bidirectional(&mut agent_down, &mut agent_up).await
        });
        client.write_all(b"late request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"late request");
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
        drop(server);
        copy.await.unwrap().unwrap();
    });
}
