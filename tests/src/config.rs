//! The agent's config file for a test cluster: a multi-document YAML of `v1` Namespace
//! and Pod objects (what `kubectl get -o yaml` prints), pods annotated with their
//! network namespace, plus any extra documents a test adds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{
    Container, HostIP, Namespace, Pod as K8sPod, PodIP, PodSpec as K8sPodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::cluster::{NETNS_ANNOTATION, Pod};

/// What to change in the generated file relative to the cluster as built.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigOptions {
    /// Pods left out, as if the API server did not know them.
    pub exclude_pods: BTreeSet<String>,
    /// Labels replacing a namespace's declared labels.
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Labels replacing a pod's labels.
    pub pod_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Annotations added to a pod's (its network namespace's).
    pub pod_annotations: BTreeMap<String, BTreeMap<String, String>>,
    /// YAML documents appended verbatim (Services, policies...), without `---`.
    pub extra_documents: Vec<String>,
    /// The configuration is meant to hold mistakes (`mesh-agent analyze` reports errors on
    /// it): written anyway. Without it, a configuration `analyze` finds an error in is
    /// refused, so every suite's valid configurations keep the analyzer honest.
    pub deliberate_errors: bool,
}

impl ConfigOptions {
    pub fn exclude(mut self, pod: impl Into<String>) -> Self {
        self.exclude_pods.insert(pod.into());
        self
    }

    pub fn namespace_labels<K: Into<String>, V: Into<String>>(
        mut self,
        namespace: impl Into<String>,
        labels: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.namespace_labels.insert(
            namespace.into(),
            labels
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        );
        self
    }

    pub fn pod_labels<K: Into<String>, V: Into<String>>(
        mut self,
        pod: impl Into<String>,
        labels: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.pod_labels.insert(
            pod.into(),
            labels
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        );
        self
    }

    pub fn pod_annotations<K: Into<String>, V: Into<String>>(
        mut self,
        pod: impl Into<String>,
        annotations: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.pod_annotations.insert(
            pod.into(),
            annotations
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        );
        self
    }

    pub fn document(mut self, yaml: impl Into<String>) -> Self {
        self.extra_documents.push(yaml.into());
        self
    }

    /// See [`ConfigOptions::deliberate_errors`].
    pub fn with_deliberate_errors(mut self) -> Self {
        self.deliberate_errors = true;
        self
    }
}

/// The errors `mesh-agent analyze` (its library, the same checks) finds in `yaml`.
pub fn analyze_errors(yaml: &str) -> Vec<String> {
    use mesh_agent::analyze::{self, Level};
    let settings = mesh_agent::config::Settings::default();
    let (objects, mut findings) = match mesh_agent::config::file::load_lenient(yaml, "config") {
        Ok((objects, _)) => (objects, Vec::new()),
        Err(e) => return vec![e.to_string()],
    };
    let (state, refused) = analyze::translate_leniently(objects, &settings);
    findings.extend(refused);
    findings.extend(analyze::analyze(&state, &settings.trust_domain));
    findings
        .iter()
        .filter(|f| f.level == Level::Error)
        .map(ToString::to_string)
        .collect()
}

/// Namespaces first, then pods in creation order, then the extra documents.
pub(super) fn render(
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    pods: &[Arc<Pod>],
    opts: &ConfigOptions,
) -> Result<String> {
    let mut docs = Vec::new();
    for (name, labels) in namespaces {
        let labels = opts.namespace_labels.get(name).unwrap_or(labels);
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: non_empty(labels),
                ..Default::default()
            },
            ..Default::default()
        };
        docs.push(serde_yaml_ng::to_string(&namespace).context("serializing a Namespace")?);
    }
    for pod in pods
        .iter()
        .filter(|p| !opts.exclude_pods.contains(p.name()))
    {
        let labels = opts.pod_labels.get(pod.name()).unwrap_or(pod.labels());
        let mut object = k8s_pod(pod, labels);
        if let Some(extra) = opts.pod_annotations.get(pod.name()) {
            object
                .metadata
                .annotations
                .get_or_insert_default()
                .extend(extra.clone());
        }
        docs.push(
            serde_yaml_ng::to_string(&object)
                .with_context(|| format!("serializing pod {}", pod.name()))?,
        );
    }
    docs.extend(opts.extra_documents.iter().cloned());
    if docs.is_empty() {
        // The agent refuses a file without objects unless it says so on purpose.
        docs.push("apiVersion: v1\nkind: List\nitems: []\n".into());
    }
    Ok(docs
        .iter()
        .map(|d| format!("---\n{}\n", d.trim_end()))
        .collect())
}

fn non_empty(labels: &BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    (!labels.is_empty()).then(|| labels.clone())
}

fn k8s_pod(pod: &Pod, labels: &BTreeMap<String, String>) -> K8sPod {
    let (host_v4, host_v6) = pod.host_ips();
    K8sPod {
        metadata: ObjectMeta {
            name: Some(pod.name().to_string()),
            namespace: Some(pod.namespace().to_string()),
            uid: Some(pod.uid().to_string()),
            labels: non_empty(labels),
            annotations: Some(
                [(
                    NETNS_ANNOTATION.to_string(),
                    pod.netns_path().display().to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        spec: Some(K8sPodSpec {
            node_name: Some(pod.node_name().to_string()),
            service_account_name: Some(pod.service_account().to_string()),
            containers: vec![Container {
                name: "app".into(),
                image: Some("mesh-pod:test".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(pod.ipv4().to_string()),
            pod_ips: Some(vec![
                PodIP {
                    ip: pod.ipv4().to_string(),
                },
                PodIP {
                    ip: pod.ipv6().to_string(),
                },
            ]),
            host_ip: Some(host_v4.to_string()),
            host_ips: Some(vec![
                HostIP {
                    ip: host_v4.to_string(),
                },
                HostIP {
                    ip: host_v6.to_string(),
                },
            ]),
            ..Default::default()
        }),
    }
}
