//! `mesh-bench` (run by `cargo xtask bench`): measures what the mesh costs, each figure
//! next to a baseline measured in the same run, reported as a ratio. `--smoke` runs every
//! case briefly so CI proves the benchmarks still work; its numbers mean nothing.
#![forbid(unsafe_code)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use clap::Parser;
use mesh_agent::identity::{FileCa, Identity, SecretManager, testing::handshake, tls};
use mesh_agent::rbac::{BenchCase, Connection, Policies, bench_policies};

#[derive(Parser)]
#[command(
    name = "mesh-bench",
    about = "mesh-agent benchmarks (ratios against a baseline of the same run)"
)]
struct Args {
    /// A few iterations of everything: checks the benchmarks run, not how fast.
    #[arg(long)]
    smoke: bool,
}

/// Median of `rounds` measurements of `per_round` calls of `f`, per call.
fn median_per_call(rounds: usize, per_round: u32, mut f: impl FnMut()) -> Duration {
    let mut samples: Vec<Duration> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..per_round {
                f();
            }
            start.elapsed() / per_round
        })
        .collect();
    samples.sort();
    samples[samples.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (rounds, evals, handshakes) = if args.smoke {
        (3, 100, 3)
    } else {
        (9, 20_000, 50)
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    // Baseline: one mutual-TLS 1.3 handshake as HBONE does it (P-256, client auth).
    let certs = SecretManager::new(FileCa::ephemeral(), Duration::from_secs(3600));
    let client: Identity = "spiffe://cluster.local/ns/client/sa/client".parse()?;
    let server: Identity = "spiffe://cluster.local/ns/bench/sa/bench".parse()?;
    rt.block_on(async {
        certs.acquire(&client).await?;
        certs.acquire(&server).await
    })?;
    let client_cfg = tls::client_config(&certs, &client, &server);
    let server_cfg = tls::server_config(&certs, &server);
    let handshake_time = median_per_call(rounds, handshakes, || {
        let (c, s) = rt.block_on(handshake(client_cfg.clone(), server_cfg.clone()));
        assert!(c.is_ok() && s.is_ok(), "benchmark handshake failed");
    });

    // Authorization of one connection against 1,000 policies in the destination's scope.
    let case = BenchCase::new("bench");
    let (policies, errors) = Policies::parse(&bench_policies(1000, "bench"), "istio-system");
    anyhow::ensure!(errors.is_empty(), "benchmark policies rejected: {errors:?}");
    let conn = Connection {
        src_ip: case.src.ip(),
        src_port: case.src.port(),
        dst_ip: case.dst.ip(),
        dst_port: case.dst.port(),
        src_identity: Some(&case.identity),
    };
    let eval_time = median_per_call(rounds, evals, || {
        black_box(policies.evaluate(black_box(&case.workload), black_box(&conn)));
    });

    println!(
        "{:<58} {:>12} {:>12} {:>10}",
        "benchmark", "value", "baseline", "ratio"
    );
    println!(
        "{:<58} {:>12} {:>12} {:>10.5}",
        "authorize 1 connection, 1,000 policies in scope (vs mTLS handshake)",
        format!("{:.2?}", eval_time),
        format!("{:.2?}", handshake_time),
        eval_time.as_secs_f64() / handshake_time.as_secs_f64()
    );
    if args.smoke {
        println!("(smoke run: figures are not meaningful)");
    }
    Ok(())
}
