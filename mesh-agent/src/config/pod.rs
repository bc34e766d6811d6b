//! A Pod as the agent keeps it: the fields it reads, with the names, nesting and JSON of
//! Kubernetes' own, and nothing else. `k8s_openapi`'s `Pod` is 2,144 bytes before anything
//! is set, and each of its containers 2,120: held for every pod of a 50,000-pod cluster
//! (the kube source's reflector stores keep every object) that was most of the agent's
//! memory. Deserialized straight from the API server's JSON (and from the file source's
//! YAML), every other field is skipped as it is read.
//!
//! Of the metadata only the identity of the object stays in `metadata` (name, namespace,
//! uid, resourceVersion, deletionTimestamp); its labels and the annotations the agent reads
//! ([`READ_ANNOTATIONS`]) move to compact maps ([`Labels`]) beside it, and everything else
//! (managed fields, owner references, other annotations such as kubectl's last-applied
//! copy of the whole object) is dropped as the pod is read. The JSON written back has the
//! labels and kept annotations in `metadata`, as Kubernetes has them.
//!
//! The type implements `k8s_openapi`'s `Resource` and `Metadata` as a `v1` `Pod`, so kube-rs
//! lists, watches and patches it like the built-in type.

use k8s_openapi::api::core::v1 as k8s;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::{DNS_CAPTURE_ANNOTATION, NETNS_ANNOTATION, SIDECAR_STATUS_ANNOTATION};
use crate::labels::Labels;

/// The pod annotations the agent reads; a pod keeps no other.
pub const READ_ANNOTATIONS: &[&str] = &[
    SIDECAR_STATUS_ANNOTATION,
    NETNS_ANNOTATION,
    DNS_CAPTURE_ANNOTATION,
];

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "PodJson", into = "PodJson")]
pub struct Pod {
    /// Name, namespace, uid, resourceVersion and deletionTimestamp; never labels or
    /// annotations (below).
    pub metadata: ObjectMeta,
    /// `metadata.labels`.
    pub labels: Labels,
    /// `metadata.annotations`, only those of [`READ_ANNOTATIONS`].
    pub annotations: Labels,
    pub spec: Option<PodSpec>,
    pub status: Option<PodStatus>,
}

/// A pod as its JSON has it.
#[derive(Clone, Serialize, Deserialize)]
struct PodJson {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spec: Option<PodSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<PodStatus>,
}

impl From<PodJson> for Pod {
    fn from(json: PodJson) -> Self {
        let meta = json.metadata;
        let annotations = meta
            .annotations
            .as_ref()
            .map(|a| Labels::filtered(a, |k| READ_ANNOTATIONS.contains(&k)))
            .unwrap_or_default();
        Pod {
            labels: meta.labels.as_ref().map(Labels::from).unwrap_or_default(),
            annotations,
            metadata: super::identity(meta),
            spec: json.spec,
            status: json.status,
        }
    }
}

impl From<Pod> for PodJson {
    fn from(pod: Pod) -> Self {
        let map = |labels: &Labels| (!labels.is_empty()).then(|| labels.to_map());
        PodJson {
            metadata: ObjectMeta {
                labels: map(&pod.labels),
                annotations: map(&pod.annotations),
                ..pod.metadata
            },
            spec: pod.spec,
            status: pod.status,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_network: Option<bool>,
    #[serde(default)]
    pub containers: Vec<Container>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_containers: Option<Vec<Container>>,
}

/// A container's name, its ports (a Service's named `targetPort` resolves through them)
/// and its restart policy (a sidecar is an init container that keeps running).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<k8s::ContainerPort>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, rename = "podIP", skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs", skip_serializing_if = "Option::is_none")]
    pub pod_ips: Option<Vec<k8s::PodIP>>,
    #[serde(default, rename = "hostIP", skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
    #[serde(default, rename = "hostIPs", skip_serializing_if = "Option::is_none")]
    pub host_ips: Option<Vec<k8s::HostIP>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<k8s::PodCondition>>,
}

impl k8s_openapi::Resource for Pod {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Pod";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "pods";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for Pod {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_kubernetes_writes_and_is_small() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"},
                         "uid": "u-1", "resourceVersion": "7", "generateName": "web-",
                         "annotations": {"sidecar.istio.io/status": "{}",
                                         "kubectl.kubernetes.io/last-applied-configuration": "{...}"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d", "uid": "u0"}],
                         "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
            "spec": {"nodeName": "n1", "serviceAccountName": "web", "hostNetwork": false,
                     "containers": [{"name": "app", "image": "app:1", "ports": [{"name": "http", "containerPort": 8080}],
                                     "env": [{"name": "A", "value": "b"}]}],
                     "initContainers": [{"name": "proxy", "restartPolicy": "Always"}],
                     "volumes": [{"name": "v", "emptyDir": {}}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}],
                       "hostIP": "192.0.2.1", "conditions": [{"type": "Ready", "status": "True"}],
                       "containerStatuses": [{"name": "app", "ready": true}]},
        }))
        .unwrap();
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
        assert_eq!(
            spec.containers[0].ports.as_ref().unwrap()[0].container_port,
            8080
        );
        let init = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(init.restart_policy.as_deref(), Some("Always"));
        let status = pod.status.as_ref().unwrap();
        assert_eq!(status.pod_ips.as_ref().unwrap()[0].ip, "10.0.0.1");
        assert_eq!(status.host_ip.as_deref(), Some("192.0.2.1"));
        // The object's identity stays; of the rest of the metadata only labels and the
        // annotations read, in their compact maps.
        assert_eq!(pod.metadata.uid.as_deref(), Some("u-1"));
        assert_eq!(pod.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(pod.labels, Labels::from([("app", "web")]));
        assert_eq!(
            pod.annotations,
            Labels::from([("sidecar.istio.io/status", "{}")])
        );
        let meta = &pod.metadata;
        assert!(meta.labels.is_none() && meta.annotations.is_none());
        assert!(meta.managed_fields.is_none() && meta.owner_references.is_none());
        assert!(meta.generate_name.is_none());
        // The JSON round-trips with Kubernetes' field names.
        let json = serde_json::to_value(&pod).unwrap();
        assert_eq!(json["status"]["podIP"], "10.0.0.1");
        assert_eq!(json["spec"]["serviceAccountName"], "web");
        assert_eq!(json["metadata"]["labels"]["app"], "web");
        assert_eq!(
            json["metadata"]["annotations"]["sidecar.istio.io/status"],
            "{}"
        );
        assert_eq!(serde_json::from_value::<Pod>(json).unwrap(), pod);
        assert!(std::mem::size_of::<Pod>() < 1024 && std::mem::size_of::<Container>() < 128);
    }
}
