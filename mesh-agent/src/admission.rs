//! Admission at a connection's destination: PeerAuthentication, then AuthorizationPolicy,
//! for a peer of a given identity (or none: plaintext) and address. One function,
//! [`PolicySet::admit`], decides for every inbound path (same-node delivery, 15006
//! plaintext, 15008 HBONE) and for the re-evaluation of live connections after a
//! configuration change. The policies are parsed once, when a configuration state is built
//! ([`crate::state::MeshState`]); what cannot be enforced as written is reported then, not
//! at the first connection.
//!
//! When the HBONE peer is the destination's waypoint, the identity checked is the
//! waypoint's: the peer is whoever presented the client certificate (Istio's semantics).

use std::{fmt, net::SocketAddr};

use serde_json::Value;

use crate::{
    identity::Identity,
    peer_auth::{MtlsMode, PeerAuthentications},
    rbac::{Connection, Decision, Policies},
    state::Workload,
};

/// The PeerAuthentications and AuthorizationPolicies of one configuration state, parsed.
#[derive(Debug, Default)]
pub struct PolicySet {
    peer_auth: PeerAuthentications,
    rbac: Policies,
    root_namespace: String,
    problems: Vec<Problem>,
}

/// A policy that cannot be enforced as written: rejected (and failing closed for what it
/// selects) or partly ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Rejected: it fails closed. Otherwise only part of it is ignored.
    pub fails_closed: bool,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl PolicySet {
    /// Parses the policy objects of a state for a mesh whose root namespace is
    /// `root_namespace`.
    pub fn parse(
        authorization_policies: &[Value],
        peer_authentications: &[Value],
        root_namespace: &str,
    ) -> Self {
        let mut problems = Vec::new();
        let (peer_auth, errors) = PeerAuthentications::parse(peer_authentications);
        for e in errors {
            let fails_closed = e.fails_closed();
            let message = if fails_closed {
                format!("{e}; PeerAuthentication rejected: the workloads it selects are STRICT")
            } else {
                format!("{e}; PeerAuthentication partly ignored")
            };
            problems.push(Problem {
                fails_closed,
                message,
            });
        }
        let (rbac, errors) = Policies::parse(authorization_policies, root_namespace);
        for e in errors {
            let fails_closed = e.fails_closed();
            let message = if fails_closed {
                format!(
                    "{e}; AuthorizationPolicy rejected: the workloads it selects deny everything"
                )
            } else {
                format!("{e}; AuthorizationPolicy partly ignored at L4")
            };
            problems.push(Problem {
                fails_closed,
                message,
            });
        }
        PolicySet {
            peer_auth,
            rbac,
            root_namespace: root_namespace.to_owned(),
            problems,
        }
    }

    /// The namespace whose policies apply mesh-wide.
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// The AuthorizationPolicies, for a waypoint's per-request verdicts.
    pub fn authorization(&self) -> &Policies {
        &self.rbac
    }

    /// What could not be enforced as written.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// Logs [`problems`](Self::problems): rejected policies as errors, partly ignored ones
    /// as warnings. Sources call it when they publish a state.
    pub fn log_problems(&self) {
        for p in &self.problems {
            if p.fails_closed {
                tracing::error!("{p}");
            } else {
                tracing::warn!("{p}");
            }
        }
    }

    /// The mTLS mode PeerAuthentication sets for `w` on `port`.
    pub fn mtls_mode(&self, w: &Workload, port: u16) -> MtlsMode {
        self.peer_auth.mode(w, port, &self.root_namespace)
    }

    /// Admits (or not) a connection at its destination `dst`: PeerAuthentication first (a
    /// peer without an identity is plaintext, refused where the mode is STRICT), then
    /// AuthorizationPolicy. Dry-run denials are logged.
    pub fn admit(&self, dst: &Workload, peer: &Peer) -> Result<Decision, Denial> {
        let admitted = self.check(dst, peer);
        if let Ok(decision) | Err(Denial::Policy(decision)) = &admitted
            && let Some(policy) = &decision.dry_run_denial
        {
            tracing::info!(
                target: "access",
                direction = "inbound",
                src.addr = %peer.src,
                dst.addr = %peer.dst,
                src.identity = peer.identity.as_ref().map(tracing::field::display),
                policy = %policy,
                "dry-run: connection would be denied"
            );
        }
        admitted
    }

    /// How [`check`](Self::check) judges the connection, step by step: the mTLS mode, and the
    /// AuthorizationPolicies' evaluation unless plaintext was refused before it.
    pub fn explain(&self, dst: &Workload, peer: &Peer) -> Admission {
        let mtls = self.mtls_mode(dst, peer.dst.port());
        let authorization = (peer.identity.is_some() || mtls != MtlsMode::Strict)
            .then(|| self.rbac.explain(dst, &peer.as_connection()));
        Admission {
            mtls,
            authorization,
        }
    }

    /// [`admit`](Self::admit) without logging (the re-evaluation of live connections).
    pub fn check(&self, dst: &Workload, peer: &Peer) -> Result<Decision, Denial> {
        let plaintext = peer.identity.is_none();
        if plaintext && self.mtls_mode(dst, peer.dst.port()) == MtlsMode::Strict {
            return Err(Denial::PlaintextUnderStrict);
        }
        let decision = self.rbac.evaluate(dst, &peer.as_connection());
        if decision.allowed {
            Ok(decision)
        } else {
            Err(Denial::Policy(decision))
        }
    }
}

/// [`PolicySet::explain`]'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// What PeerAuthentication sets for the destination's port.
    pub mtls: MtlsMode,
    /// `None`: a plaintext peer refused under STRICT, before any AuthorizationPolicy.
    pub authorization: Option<crate::rbac::Explanation>,
}

impl Admission {
    pub fn allowed(&self) -> bool {
        self.authorization
            .as_ref()
            .is_some_and(|e| e.decision.allowed)
    }
}

/// The source side of an inbound connection, as admission sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// Verified (HBONE) or known (same-node) identity; `None` for plaintext.
    pub identity: Option<Identity>,
}

impl Peer {
    fn as_connection(&self) -> Connection<'_> {
        Connection {
            src_ip: self.src.ip(),
            src_port: self.src.port(),
            dst_ip: self.dst.ip(),
            dst_port: self.dst.port(),
            src_identity: self.identity.as_ref(),
            request: None,
        }
    }
}

/// Why a connection was not admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    /// Plaintext to a port whose PeerAuthentication is STRICT.
    PlaintextUnderStrict,
    /// An AuthorizationPolicy denied it (the decision names the policy).
    Policy(Decision),
}

impl Denial {
    /// The `reason` label of `mesh_agent_connections_denied_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::PlaintextUnderStrict => "plaintext_under_strict",
            Denial::Policy(_) => "authorization_policy",
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::PlaintextUnderStrict => {
                f.write_str("plaintext under STRICT PeerAuthentication")
            }
            Denial::Policy(decision) => write!(f, "AuthorizationPolicy: {decision}"),
        }
    }
}

#[cfg(test)]
mod tests {

    use serde_json::json;

    use super::*;

    fn web() -> Workload {
        Workload {
            uid: "web-1".into(),
            name: "web-1".into(),
            namespace: "shop".into(),
            node: Some("n1".into()),
            service_account: "web".into(),
            ips: vec!["10.0.0.2".parse().unwrap()],
            labels: [("app", "web")].into(),
            workload_name: "web".into(),
            netns: None,
            captured: true,
            host_network: false,
            dns_capture: None,
            waypoint: None,
        }
    }

    fn peer(identity: Option<&str>) -> Peer {
        Peer {
            src: "10.0.0.1:40000".parse().unwrap(),
            dst: "10.0.0.2:8080".parse().unwrap(),
            identity: identity.map(|i| i.parse().unwrap()),
        }
    }

    fn strict(namespace: &str) -> Value {
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": namespace},
            "spec": {"mtls": {"mode": "STRICT"}}})
    }

    fn only_from(principal: &str) -> Value {
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "only-client", "namespace": "shop"},
            "spec": {"rules": [{"from": [{"source": {"principals": [principal]}}]}]}})
    }

    /// What, AuthorizationPolicies, PeerAuthentications, the peer's identity, the verdict.
    type Case = (
        &'static str,
        Vec<Value>,
        Vec<Value>,
        Option<&'static str>,
        Result<&'static str, &'static str>,
    );

    #[test]
    fn peer_authentication_then_authorization_policy_with_the_deciding_policy() {
        let client = Some("spiffe://cluster.local/ns/shop/sa/client");
        let waypoint = Some("spiffe://cluster.local/ns/shop/sa/waypoint");
        let cases: &[Case] = &[
            (
                "no policy, plaintext",
                vec![],
                vec![],
                None,
                Ok("allowed: no ALLOW policy applies"),
            ),
            (
                "STRICT, plaintext",
                vec![],
                vec![strict("shop")],
                None,
                Err("plaintext under STRICT PeerAuthentication"),
            ),
            (
                "STRICT elsewhere, plaintext",
                vec![],
                vec![strict("other")],
                None,
                Ok("allowed: no ALLOW policy applies"),
            ),
            (
                "STRICT, mutual TLS",
                vec![],
                vec![strict("shop")],
                client,
                Ok("allowed: no ALLOW policy applies"),
            ),
            (
                "ALLOW matching",
                vec![only_from("cluster.local/ns/shop/sa/client")],
                vec![],
                client,
                Ok("allowed by shop/only-client"),
            ),
            (
                "ALLOW not matching: the waypoint's identity is what is checked",
                vec![only_from("cluster.local/ns/shop/sa/client")],
                vec![],
                waypoint,
                Err("AuthorizationPolicy: denied: no ALLOW policy matched"),
            ),
            (
                "PeerAuthentication comes first",
                vec![only_from("cluster.local/ns/shop/sa/client")],
                vec![strict("shop")],
                None,
                Err("plaintext under STRICT PeerAuthentication"),
            ),
        ];
        for (what, authz, peer_auth, identity, want) in cases {
            let set = PolicySet::parse(authz, peer_auth, "istio-system");
            let got = set
                .admit(&web(), &peer(*identity))
                .map(|d| d.to_string())
                .map_err(|d| d.to_string());
            let want = want.map(str::to_owned).map_err(str::to_owned);
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn what_cannot_be_enforced_is_reported_when_parsed() {
        let broken = json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "broken", "namespace": "shop"},
            "spec": {"action": "MAYBE"}});
        let set = PolicySet::parse(&[broken], &[], "istio-system");
        assert_eq!(set.problems().len(), 1);
        let problem = &set.problems()[0];
        assert!(problem.fails_closed);
        assert!(problem.message.contains("shop/broken"), "{problem}");
        assert!(problem.message.contains("deny everything"), "{problem}");
        // And it does fail closed.
        assert!(set.admit(&web(), &peer(None)).is_err());
    }
}
