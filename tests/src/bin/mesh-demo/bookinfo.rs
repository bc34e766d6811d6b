//! `mesh-demo bookinfo` (`cargo xtask demo bookinfo`): Istio's Bookinfo behind the ingress
//! gateway on the netns cluster, walked through the traffic-management tasks
//! ([`tests::walkthrough`]): each step prints the YAML it applies, what the product pages
//! showed, and ok or FAIL; then the service graph from Prometheus by Kiali's queries, as
//! text and as a picture drawn by Graphviz. Exits 0 only if every step holds.

use anyhow::{Context, Result};
use tests::prometheus;
use tests::walkthrough::Walkthrough;

pub fn run(verbose: bool) -> Result<bool> {
    println!("Bookinfo on mesh-agent\n======================");
    println!(
        "building: 2 nodes, Bookinfo (productpage, details, reviews v1/v2/v3, ratings) spread over both,\n\
         a waypoint for namespace default, an ingress gateway in istio-system, Prometheus, a client outside the mesh"
    );
    let started = std::time::Instant::now();
    let w = Walkthrough::start()?;
    println!(
        "ready in {:.1} s; requests go from the client through the ingress gateway on :8080\n",
        started.elapsed().as_secs_f64()
    );
    let reports = w.run(|r| {
        println!("--- {}", r.name);
        for (file, text) in &r.applied {
            println!("applied {}:", tests::walkthrough::sample_path(file));
            if verbose {
                for line in text.lines() {
                    println!("    {line}");
                }
            } else {
                for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
                    println!("    {line}");
                }
            }
        }
        println!("observed: {}", r.evidence);
        println!("{}\n", if r.ok { "ok" } else { "FAIL" });
    });

    println!("--- the service graph, from Prometheus by Kiali's query");
    println!("    {}", prometheus::kiali_request_query("1m"));
    let graph_ok = match w.graph() {
        Ok((edges, tcp)) => {
            for e in &edges {
                println!(
                    "    {:<40} -> {:<28} {:>6.2} req/s  {:>3.0} % 5xx",
                    e.source,
                    e.destination,
                    e.rate,
                    e.errors * 100.0
                );
            }
            println!("    TCP (bytes/s), {}:", prometheus::kiali_tcp_query("1m"));
            for (labels, value) in &tcp {
                let get = |k: &str| labels.get(k).map_or("unknown", String::as_str);
                println!(
                    "    {:<40} -> {:<28} {:>8.0} B/s",
                    format!(
                        "{}.{}",
                        get("source_workload"),
                        get("source_workload_namespace")
                    ),
                    get("destination_service_name"),
                    value
                );
            }
            let picture = w.output_dir().join("bookinfo-graph.svg");
            prometheus::render(&prometheus::dot(&edges), &picture).context("drawing the graph")?;
            let kept = std::env::temp_dir().join("mesh-demo-bookinfo-graph.svg");
            std::fs::copy(&picture, &kept)?;
            println!("    drawn by Graphviz: {}\nok\n", kept.display());
            true
        }
        Err(e) => {
            println!("    {e:#}\nFAIL\n");
            false
        }
    };
    let failed = reports.iter().filter(|r| !r.ok).count() + usize::from(!graph_ok);
    let total = reports.len() + 1;
    if failed == 0 {
        println!("RESULT: ok: {total} of {total} steps held");
    } else {
        println!("RESULT: FAIL: {failed} of {total} steps did not hold");
    }
    Ok(failed == 0)
}
