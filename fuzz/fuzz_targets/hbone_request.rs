//! Whatever a peer sends after TLS on an HBONE connection: the server's own HTTP/2 settings
//! and stream loop, each request judged as a node proxy judges it (the target must be a
//! CONNECT to the pod's address and not an agent port) and answered. Panics and hangs are
//! the defects looked for.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mesh_agent::proxy::hbone::server;
use tokio::io::AsyncWriteExt;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let (mut client, server_io) = tokio::io::duplex(1 << 16);
        let input = data.to_vec();
        let writer = tokio::spawn(async move {
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
            // Keep reading what the server answers so it never blocks on a full pipe.
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut client, &mut sink).await;
        });
        let serve = async {
            let Ok(connection) = server::h2_server()
                .handshake::<_, bytes::Bytes>(server_io)
                .await
            else {
                return;
            };
            let pod_ips = ["10.1.0.7".parse().unwrap()];
            let never = mesh_agent::drain::Drain::default();
            let _ = server::serve_streams(
                connection,
                Duration::from_millis(50),
                never.signal(),
                |req, respond| {
                    let code = match server::pod_target(req.method(), req.uri(), &pod_ips) {
                        Ok(_) => http::StatusCode::SERVICE_UNAVAILABLE,
                        Err((code, _)) => code,
                    };
                    server::refuse(respond, code);
                    std::future::ready(())
                },
            )
            .await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), serve).await;
        writer.abort();
    });
});
