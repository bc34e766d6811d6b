//! Kernel suite: Istio's Bookinfo behind the ingress gateway, walked through Istio's
//! traffic-management tasks ([`tests::walkthrough`], the same steps `cargo xtask demo
//! bookinfo` runs), then the service graph from a real Prometheus by Kiali's query.

use std::time::Duration;

use tests::otlp::ReceivedSpan;
use tests::{eventually, require_root, walkthrough::Walkthrough};

#[test]
fn bookinfo_through_the_ingress_gateway_follows_istios_tasks() {
    if !require_root() {
        return;
    }
    let w = Walkthrough::start().expect("starting Bookinfo on the cluster");
    traces_chain_the_gateway_the_waypoint_and_the_next_hops(&w);
    let reports = w.run(|r| {
        println!(
            "{} {}: {}",
            if r.ok { "ok  " } else { "FAIL" },
            r.name,
            r.evidence
        )
    });
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !r.ok)
        .map(|r| format!("{}: {}", r.name, r.evidence))
        .collect();
    assert!(failed.is_empty(), "steps failed:\n{}", failed.join("\n"));

    // Prometheus has every edge of Bookinfo, reported by the waypoint (and the gateway as
    // a source), with the labels Kiali groups by.
    let (edges, _) = w.graph().expect("the service graph");
    println!("{edges:#?}");
    let series = w
        .query("istio_requests_total{reporter=\"waypoint\", destination_service_name=\"reviews\"}")
        .unwrap();
    assert!(!series.is_empty(), "no waypoint series for reviews");
    for (labels, _) in &series {
        for key in [
            "source_workload",
            "source_workload_namespace",
            "source_canonical_service",
            "source_canonical_revision",
            "source_principal",
            "destination_service_name",
            "destination_service_namespace",
            "destination_workload",
            "destination_version",
            "destination_canonical_service",
            "request_protocol",
            "response_code",
            "response_flags",
        ] {
            assert!(
                labels.get(key).is_some_and(|v| !v.is_empty()),
                "{key} missing in {labels:?}"
            );
        }
    }
    let versions: std::collections::BTreeSet<&str> = series
        .iter()
        .filter_map(|(l, _)| l.get("destination_version").map(String::as_str))
        .collect();
    assert!(
        ["v1", "v2", "v3"].iter().all(|v| versions.contains(v)),
        "reviews versions in Prometheus: {versions:?}"
    );

    // The node agents' TCP series, with the labels Kiali's TCP graph groups by: every
    // Bookinfo service received connections (from the waypoint or the gateway), each series
    // filled from the pods' app/version labels.
    let tcp = w
        .query("istio_tcp_connections_opened_total{reporter=\"destination\"}")
        .unwrap();
    let services: std::collections::BTreeSet<&str> = tcp
        .iter()
        .filter_map(|(l, _)| l.get("destination_service_name").map(String::as_str))
        .collect();
    for service in ["productpage", "details", "reviews", "ratings"] {
        assert!(
            services.contains(service),
            "no TCP series for {service}: {services:?}"
        );
    }
    // And bytes, which Kiali draws TCP edges by: counted as they move, so the waypoint's
    // pooled connections to productpage and details, open all along, show theirs too.
    let bytes = w
        .query("sum by (destination_service_name) (istio_tcp_received_bytes_total{reporter=\"destination\"})")
        .unwrap();
    for service in ["productpage", "details", "reviews", "ratings"] {
        let received = bytes
            .iter()
            .find(|(l, _)| l.get("destination_service_name").map(String::as_str) == Some(service))
            .map_or(0.0, |(_, v)| *v);
        assert!(
            received > 0.0,
            "no request bytes to {service} yet: {bytes:?}"
        );
    }
    for (labels, _) in tcp.iter().filter(|(l, _)| {
        l.get("destination_service_name")
            .is_some_and(|s| s == "reviews")
    }) {
        for (key, want) in [
            ("destination_service_namespace", Some("default")),
            ("destination_app", Some("reviews")),
            ("destination_canonical_service", Some("reviews")),
            ("request_protocol", Some("tcp")),
            ("response_flags", Some("-")),
            ("source_cluster", Some("Kubernetes")),
            ("destination_version", None),
            ("source_canonical_service", None),
        ] {
            let got = labels.get(key).map(String::as_str);
            match want {
                Some(v) => assert_eq!(got, Some(v), "{key} in {labels:?}"),
                None => assert!(got.is_some_and(|v| !v.is_empty()), "{key} in {labels:?}"),
            }
        }
    }
    let (_, kiali_tcp) = w.graph().unwrap();
    assert!(
        !kiali_tcp.is_empty(),
        "Kiali's TCP graph query returned nothing"
    );
}

/// One product page, sent as the child of a client span, makes one trace: the gateway's
/// span is the client span's child, the waypoint's span for productpage the gateway's, and
/// the waypoint's spans for what productpage calls (details, reviews) that one's — the
/// application carried the context it was given, as Bookinfo does.
fn traces_chain_the_gateway_the_waypoint_and_the_next_hops(w: &Walkthrough) {
    let (trace, client) = w.traced_page().expect("a traced product page");
    let by_parent = |spans: &[ReceivedSpan], parent: &str| -> Vec<ReceivedSpan> {
        spans
            .iter()
            .filter(|s| s.parent_span_id.as_deref() == Some(parent))
            .cloned()
            .collect()
    };
    let mut spans = Vec::new();
    let complete = eventually(Duration::from_secs(10), || {
        spans = w.trace(&trace);
        let gateway = by_parent(&spans, &client);
        let Some(gateway) = gateway.first() else {
            return false;
        };
        let page = by_parent(&spans, &gateway.span_id);
        page.first()
            .is_some_and(|p| by_parent(&spans, &p.span_id).len() >= 2)
    });
    assert!(complete, "the trace's spans: {spans:#?}");
    let gateway = &by_parent(&spans, &client)[0];
    assert_eq!(gateway.service, "istio-ingressgateway.istio-system");
    assert!(
        gateway
            .name
            .starts_with("productpage.default.svc.cluster.local:9080"),
        "{gateway:?}"
    );
    let tag = |s: &ReceivedSpan, k: &str| s.attributes.get(k).cloned().unwrap_or_default();
    assert_eq!(tag(gateway, "http.status_code"), "200");
    assert_eq!(tag(gateway, "http.method"), "GET");
    assert_eq!(tag(gateway, "response_flags"), "-");
    let page = &by_parent(&spans, &gateway.span_id)[0];
    assert_eq!(page.service, "waypoint.default");
    assert_eq!(tag(page, "destination_workload"), "productpage", "{page:?}");
    assert_eq!(tag(page, "destination_namespace"), "default");
    assert_eq!(
        tag(page, "source_workload"),
        "istio-ingressgateway",
        "{page:?}"
    );
    assert_eq!(tag(page, "source_namespace"), "istio-system");
    assert_eq!(
        tag(page, "guid:x-request-id"),
        tag(gateway, "guid:x-request-id"),
        "one request id along the way"
    );
    let next: Vec<ReceivedSpan> = by_parent(&spans, &page.span_id);
    let names: Vec<&str> = next.iter().map(|s| s.name.as_str()).collect();
    for service in ["details", "reviews"] {
        assert!(
            names
                .iter()
                .any(|n| n.starts_with(&format!("{service}.default.svc.cluster.local:9080"))),
            "no {service} span under productpage's: {names:?}"
        );
    }
    for s in &next {
        assert_eq!(s.service, "waypoint.default");
        assert_eq!(tag(s, "source_workload"), "productpage", "{s:?}");
    }
}
