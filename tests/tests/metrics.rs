//! Kernel test of the agents' `/metrics` exposition as Prometheus reads it: after
//! same-node, cross-node, plaintext and denied connections, both agents' output parses
//! with a Prometheus text parser and carries exactly the expected series (names and label
//! names), so dashboards and alerts written against them keep working.

use std::collections::BTreeSet;
use std::time::Duration;

use tests::{Cluster, ConfigOptions, PodSpec, eventually, require_root};

const APP: u16 = 8080;

/// Every series name with its label names, as (name, "label,label,...").
fn series(text: &str) -> BTreeSet<(String, String)> {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    scrape
        .samples
        .iter()
        .map(|s| {
            let mut labels: Vec<&str> = s.labels.keys().map(String::as_str).collect();
            labels.sort();
            (s.metric.clone(), labels.join(","))
        })
        .collect()
}

/// Istio's TCP labels, with every one Kiali's graph and Istio's dashboards group by.
const TCP_LABELS: &str = "connection_security_policy,destination_app,destination_canonical_revision,destination_canonical_service,destination_cluster,destination_principal,destination_service,destination_service_name,destination_service_namespace,destination_version,destination_workload,destination_workload_namespace,reporter,request_protocol,response_flags,source_app,source_canonical_revision,source_canonical_service,source_cluster,source_principal,source_version,source_workload,source_workload_namespace";

#[test]
fn both_agents_expose_the_istio_and_agent_series_in_prometheus_text() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::builder()
        .nodes(2)
        .ambient_namespace("shop")
        .namespace("legacy", [("team", "old")])
        .pod(PodSpec::new("a", "shop", 0).service_account("client"))
        .pod(PodSpec::new("b", "shop", 0).label("app", "web"))
        .pod(PodSpec::new("c", "shop", 1).label("app", "web"))
        .pod(PodSpec::new("l1", "legacy", 0))
        .build()
        .unwrap();
    for pod in ["b", "c"] {
        cluster.pod(pod).spawn_server(&[APP]).unwrap();
    }
    let deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-9, namespace: shop}\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation: {ports: [\"9\"]}\n";
    cluster
        .write_config(
            &cluster.config_path(),
            &ConfigOptions::default().document(deny),
        )
        .unwrap();
    cluster.start_agents(&cluster.config_path()).unwrap();
    let (a, b, c, l1) = (
        cluster.pod("a"),
        cluster.pod("b"),
        cluster.pod("c"),
        cluster.pod("l1"),
    );
    for (client, to) in [
        (&a, b.addr_v4(APP)),
        (&a, c.addr_v4(APP)),
        (&l1, b.addr_v4(APP)),
    ] {
        let r = client.connect(to, 1024).unwrap();
        assert!(r.ok, "{r:?}");
    }
    let r = a
        .connect_timeout(c.addr_v4(9), 64, Duration::from_secs(2))
        .unwrap();
    assert!(!r.ok);
    let tcp = [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
    ];
    let mut expected: BTreeSet<(String, String)> = tcp
        .iter()
        .map(|n| (n.to_string(), TCP_LABELS.to_string()))
        .collect();
    expected.extend([
        (
            "mesh_agent_same_node_connections_total".into(),
            "datapath".into(),
        ),
        (
            "mesh_agent_redirect_forwarded_bytes_total".into(),
            String::new(),
        ),
        (
            "mesh_agent_hbone_handshakes_refused_total".into(),
            String::new(),
        ),
    ]);
    let denied = (
        "mesh_agent_connections_denied_total".to_string(),
        "destination_workload,destination_workload_namespace,reason".to_string(),
    );
    // Node 2 denied the connection to c:9; node 1 did not deny anything.
    assert!(eventually(Duration::from_secs(3), || {
        let text = cluster.node(1).metrics().unwrap();
        series(&text).contains(&denied)
    }));
    for (node, with_denied) in [(0, false), (1, true)] {
        let text = cluster.node(node).metrics().unwrap();
        let mut want = expected.clone();
        if with_denied {
            want.insert(denied.clone());
        }
        assert_eq!(series(&text), want, "node {}:\n{text}", node + 1);
    }
}
