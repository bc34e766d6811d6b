//! SPIFFE workload identities (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`),
//! the only identity form Istio and ztunnel put in workload certificates, and reading them
//! back out of a certificate's URI SANs.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

const SCHEME: &str = "spiffe://";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error(
        "invalid SPIFFE identity {input:?}: {reason} (expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)"
    )]
    Invalid { input: String, reason: &'static str },
}

/// The identity of a Kubernetes service account in a trust domain.
///
/// `Display` writes `spiffe://<td>/ns/<ns>/sa/<sa>`; `FromStr` accepts exactly that form
/// (the one ztunnel accepts), with non-empty path segments of SPIFFE-legal characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    /// The identity of `workload`'s pods: its namespace and service account.
    pub fn of(trust_domain: &str, workload: &crate::state::Workload) -> Self {
        Identity::new(
            trust_domain,
            workload.namespace.as_str(),
            workload.service_account.as_str(),
        )
    }

    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Self {
        Identity {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = SpiffeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| SpiffeError::Invalid {
            input: s.to_owned(),
            reason,
        };
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid("does not start with spiffe://"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [td, "ns", ns, "sa", sa] = parts[..] else {
            return Err(invalid("path is not /ns/<namespace>/sa/<service-account>"));
        };
        // SPIFFE ID spec: trust domain is lowercase letters, digits, '.', '-', '_'.
        if td.is_empty()
            || !td.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            })
        {
            return Err(invalid(
                "trust domain is empty or has characters other than a-z 0-9 . - _",
            ));
        }
        for segment in [ns, sa] {
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err(invalid("empty or relative path segment"));
            }
            if !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            {
                return Err(invalid(
                    "path segment has characters other than A-Z a-z 0-9 . - _",
                ));
            }
        }
        Ok(Identity::new(td, ns, sa))
    }
}

/// The SPIFFE identities in the URI SANs of a DER certificate, in order. URI SANs that are
/// not SPIFFE identities are skipped; an unparsable certificate has none.
pub(crate) fn certificate_identities(cert_der: &[u8]) -> Vec<Identity> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert_der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.parse().ok(),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_id_round_trips() {
        let cases = [
            (
                "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
                ("cluster.local", "default", "bookinfo-productpage"),
            ),
            ("spiffe://td_1-x/ns/a.b/sa/C_d", ("td_1-x", "a.b", "C_d")),
        ];
        for (text, (td, ns, sa)) in cases {
            let id: Identity = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(id, Identity::new(td, ns, sa), "{text}");
            assert_eq!(id.to_string(), text);
        }
    }

    #[test]
    fn only_the_ns_sa_form_parses() {
        let rejected = [
            "",
            "cluster.local/ns/default/sa/x",
            "https://cluster.local/ns/default/sa/x",
            "spiffe://cluster.local/ns/default/sa/x/",
            "spiffe://cluster.local/ns/default/sa/",
            "spiffe://cluster.local/ns//sa/x",
            "spiffe://cluster.local/sa/x/ns/default",
            "spiffe://cluster.local/ns/default/sa/x/extra",
            "spiffe:///ns/default/sa/x",
            "spiffe://Cluster.Local/ns/default/sa/x",
            "spiffe://cluster.local:8080/ns/default/sa/x",
            "spiffe://cluster.local/ns/../sa/x",
            "spiffe://cluster.local/ns/default/sa/x?y",
            "spiffe://cluster.local/ns/default/sa/x y",
        ];
        for text in rejected {
            let err = text.parse::<Identity>().expect_err(text);
            assert!(err.to_string().contains(&format!("{text:?}")), "{err}");
        }
    }
}
