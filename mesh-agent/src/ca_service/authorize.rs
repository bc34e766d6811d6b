//! Who may have which certificate, decided from the mesh's own state: a node agent may have
//! the identities of the captured pods scheduled on its node, except those of pods that run a
//! gateway (a waypoint or an ingress gateway proves its own identity); anyone else may have
//! only its own identity. This is istiod's node authorizer, narrowed to captured pods.

use std::fmt;

use crate::{
    identity::Identity,
    state::{GATEWAY_NAME_LABEL, MeshState, Workload},
};

/// The URI SAN path of a node credential: `spiffe://<trust-domain>/mesh-agent/node/<node>`.
/// It is not a workload identity (no `/ns/…/sa/…`), so HBONE peers never accept it.
const NODE_PATH: &str = "/mesh-agent/node/";

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A node agent: by a node credential (file mode) or the token of a trusted node
    /// account whose pod runs on the node (Kubernetes mode).
    Node(String),
    /// A workload (a waypoint, a gateway, any pod) by its own certificate or token.
    Workload(Identity),
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Node(node) => write!(f, "node {node}"),
            Caller::Workload(id) => write!(f, "{id}"),
        }
    }
}

/// A refusal, with what the log and the caller are told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied(pub String);

/// The URI a node credential for `node` names.
pub fn node_credential_uri(trust_domain: &str, node: &str) -> String {
    format!("spiffe://{trust_domain}{NODE_PATH}{node}")
}

/// The caller a verified client certificate names: a node credential of our trust domain,
/// or exactly one workload identity.
pub fn caller_from_certificate(cert_der: &[u8], trust_domain: &str) -> Option<Caller> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    let [uri] = uris[..] else { return None };
    let node_prefix = format!("spiffe://{trust_domain}{NODE_PATH}");
    if let Some(node) = uri.strip_prefix(&node_prefix) {
        return (!node.is_empty() && !node.contains('/')).then(|| Caller::Node(node.to_owned()));
    }
    uri.parse().ok().map(Caller::Workload)
}

/// The identity `caller` gets when it asks for `requested` (the request's impersonated
/// identity; none: the caller's own).
pub fn authorize(
    caller: &Caller,
    requested: Option<&str>,
    state: &MeshState,
    trust_domain: &str,
) -> Result<Identity, Denied> {
    let requested = match requested {
        Some(text) => Some(
            text.parse::<Identity>()
                .map_err(|e| Denied(e.to_string()))?,
        ),
        None => None,
    };
    if let Some(id) = &requested
        && id.trust_domain != trust_domain
    {
        return Err(Denied(format!(
            "{id} is not in this mesh's trust domain {trust_domain}"
        )));
    }
    match (caller, requested) {
        (Caller::Workload(own), None) => Ok(own.clone()),
        (Caller::Workload(own), Some(id)) if *own == id => Ok(id),
        (Caller::Workload(own), Some(id)) => Err(Denied(format!(
            "{own} may have only its own identity, not {id}"
        ))),
        (Caller::Node(node), None) => Err(Denied(format!(
            "node {node} has no identity of its own: name a pod's identity in the request's ImpersonatedIdentity"
        ))),
        (Caller::Node(node), Some(id)) => {
            node_may_have(state, node, &id, trust_domain).map(|()| id)
        }
    }
}

fn node_may_have(
    state: &MeshState,
    node: &str,
    id: &Identity,
    trust_domain: &str,
) -> Result<(), Denied> {
    let mut gateway_pod = None;
    for w in state.local_captured(node) {
        if w.host_network || Identity::of(trust_domain, w) != *id {
            continue;
        }
        if runs_a_gateway(w) {
            gateway_pod.get_or_insert(w);
            continue;
        }
        return Ok(());
    }
    Err(Denied(match gateway_pod {
        Some(w) => format!(
            "{id} on node {node} is the identity of gateway pod {}/{}, which proves its own identity",
            w.namespace, w.name
        ),
        None => format!("no captured pod on node {node} runs as {id}"),
    }))
}

/// Whether `w` runs a gateway (a waypoint or an ingress gateway): Gateway API labels every
/// gateway's pods with the gateway's name.
fn runs_a_gateway(w: &Workload) -> bool {
    w.labels.contains_key(GATEWAY_NAME_LABEL)
}

#[cfg(test)]
mod tests {
    use crate::labels::Labels;

    use super::*;
    use crate::state::RawObjects;

    fn pod(name: &str, ns: &str, sa: &str, node: &str, captured: bool) -> Workload {
        Workload {
            uid: format!("uid-{name}"),
            name: name.into(),
            namespace: ns.into(),
            node: Some(node.into()),
            service_account: sa.into(),
            ips: vec![],
            labels: Labels::new(),
            workload_name: name.into(),
            netns: None,
            captured,
            host_network: false,
            dns_capture: None,
            waypoint: None,
        }
    }

    fn state() -> MeshState {
        let mut waypoint = pod("waypoint-0", "shop", "waypoint", "n1", true);
        waypoint.labels.insert(GATEWAY_NAME_LABEL, "waypoint");
        MeshState::new(
            vec![
                pod("reviews-0", "shop", "reviews", "n1", true),
                pod("ratings-0", "shop", "ratings", "n2", true),
                pod("legacy-0", "shop", "legacy", "n1", false),
                waypoint,
            ],
            vec![],
            RawObjects::default(),
        )
    }

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "shop", sa)
    }

    #[test]
    fn a_node_gets_the_identities_of_its_captured_pods_only() {
        let state = state();
        let node = Caller::Node("n1".into());
        let ask = |sa: &str| authorize(&node, Some(&id(sa).to_string()), &state, "cluster.local");
        assert_eq!(ask("reviews"), Ok(id("reviews")));
        let cases = [
            ("ratings", "no captured pod on node n1 runs as"),
            ("legacy", "no captured pod on node n1"),
            ("waypoint", "gateway pod shop/waypoint-0"),
            ("nobody", "no captured pod"),
        ];
        for (sa, want) in cases {
            let Denied(reason) = ask(sa).unwrap_err();
            assert!(reason.contains(want), "{sa}: {reason}");
        }
        let Denied(reason) = authorize(&node, None, &state, "cluster.local").unwrap_err();
        assert!(reason.contains("ImpersonatedIdentity"), "{reason}");
    }

    #[test]
    fn a_workload_gets_only_its_own_identity() {
        let state = state();
        let me = Caller::Workload(id("waypoint"));
        assert_eq!(
            authorize(&me, None, &state, "cluster.local"),
            Ok(id("waypoint"))
        );
        assert_eq!(
            authorize(
                &me,
                Some(&id("waypoint").to_string()),
                &state,
                "cluster.local"
            ),
            Ok(id("waypoint"))
        );
        let Denied(reason) = authorize(
            &me,
            Some(&id("reviews").to_string()),
            &state,
            "cluster.local",
        )
        .unwrap_err();
        assert!(reason.contains("only its own identity"), "{reason}");
    }

    #[test]
    fn other_trust_domains_and_malformed_identities_are_refused() {
        let state = state();
        let node = Caller::Node("n1".into());
        let foreign = Identity::new("example.org", "shop", "reviews").to_string();
        let Denied(reason) = authorize(&node, Some(&foreign), &state, "cluster.local").unwrap_err();
        assert!(reason.contains("trust domain cluster.local"), "{reason}");
        let Denied(reason) = authorize(
            &node,
            Some("spiffe://cluster.local/x"),
            &state,
            "cluster.local",
        )
        .unwrap_err();
        assert!(reason.contains("invalid SPIFFE identity"), "{reason}");
    }

    #[test]
    fn node_credentials_are_told_from_workload_certificates() {
        use rcgen::{CertificateParams, KeyPair, SanType};
        let cert = |uris: &[&str]| {
            let mut params = CertificateParams::default();
            params.subject_alt_names = uris
                .iter()
                .map(|u| SanType::URI((*u).try_into().unwrap()))
                .collect();
            params
                .self_signed(&KeyPair::generate().unwrap())
                .unwrap()
                .der()
                .to_vec()
        };
        let node = node_credential_uri("cluster.local", "n1");
        let cases = [
            (vec![node.as_str()], Some(Caller::Node("n1".into()))),
            (
                vec!["spiffe://cluster.local/ns/shop/sa/reviews"],
                Some(Caller::Workload(id("reviews"))),
            ),
            (vec!["spiffe://example.org/mesh-agent/node/n1"], None),
            (vec!["spiffe://cluster.local/mesh-agent/node/"], None),
            (
                vec![node.as_str(), "spiffe://cluster.local/ns/shop/sa/reviews"],
                None,
            ),
            (vec![], None),
        ];
        for (uris, want) in cases {
            assert_eq!(
                caller_from_certificate(&cert(&uris), "cluster.local"),
                want,
                "{uris:?}"
            );
        }
    }
}
