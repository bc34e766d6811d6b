//! An EndpointSlice as the agent keeps it: what the load balancer reads (the service it
//! belongs to, its ports, each endpoint's addresses and readiness), with Kubernetes' names
//! and JSON. `k8s_openapi`'s `Endpoint` is some 320 bytes before its strings (topology,
//! hints, hostname, zone, a full object reference) and a large cluster has one per pod;
//! everything else is skipped as the slice is read, as [`super::Pod`] does for pods.

use k8s_openapi::api::discovery::v1 as k8s;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use crate::labels::Labels;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "SliceJson", into = "SliceJson")]
pub struct EndpointSlice {
    /// The object's identity only ([`super::identity`]); labels are below.
    pub metadata: ObjectMeta,
    /// `metadata.labels` (`kubernetes.io/service-name` names the service).
    pub labels: Labels,
    pub address_type: String,
    pub ports: Option<Vec<k8s::EndpointPort>>,
    pub endpoints: Vec<Endpoint>,
}

/// An endpoint's addresses and its readiness.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Endpoint {
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<k8s::EndpointConditions>,
}

/// A slice as its JSON has it.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SliceJson {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    address_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ports: Option<Vec<k8s::EndpointPort>>,
    #[serde(default)]
    endpoints: Vec<Endpoint>,
}

impl From<SliceJson> for EndpointSlice {
    fn from(json: SliceJson) -> Self {
        EndpointSlice {
            labels: json
                .metadata
                .labels
                .as_ref()
                .map(Labels::from)
                .unwrap_or_default(),
            metadata: super::identity(json.metadata),
            address_type: json.address_type,
            ports: json.ports,
            endpoints: json.endpoints,
        }
    }
}

impl From<EndpointSlice> for SliceJson {
    fn from(slice: EndpointSlice) -> Self {
        SliceJson {
            metadata: ObjectMeta {
                labels: (!slice.labels.is_empty()).then(|| slice.labels.to_map()),
                ..slice.metadata
            },
            address_type: slice.address_type,
            ports: slice.ports,
            endpoints: slice.endpoints,
        }
    }
}

impl k8s_openapi::Resource for EndpointSlice {
    const API_VERSION: &'static str = "discovery.k8s.io/v1";
    const GROUP: &'static str = "discovery.k8s.io";
    const KIND: &'static str = "EndpointSlice";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "endpointslices";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for EndpointSlice {
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
    fn reads_what_kubernetes_writes_and_keeps_what_is_read() {
        let json = serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abc", "namespace": "shop", "uid": "u", "resourceVersion": "9",
                         "labels": {"kubernetes.io/service-name": "web"},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "s"}],
                         "managedFields": [{"manager": "kube-controller-manager"}]},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": true, "serving": true},
                           "nodeName": "n1", "zone": "z", "hints": {"forZones": [{"name": "z"}]},
                           "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop", "uid": "p"}}],
        });
        let slice: EndpointSlice = serde_json::from_value(json).unwrap();
        assert_eq!(slice.labels.get("kubernetes.io/service-name"), Some("web"));
        assert_eq!(slice.metadata.name.as_deref(), Some("web-abc"));
        assert_eq!(slice.metadata.resource_version.as_deref(), Some("9"));
        assert!(slice.metadata.owner_references.is_none() && slice.metadata.labels.is_none());
        assert_eq!(slice.address_type, "IPv4");
        assert_eq!(slice.ports.as_ref().unwrap()[0].port, Some(8080));
        let endpoint = &slice.endpoints[0];
        assert_eq!(endpoint.addresses, ["10.0.0.1"]);
        assert_eq!(endpoint.conditions.as_ref().unwrap().ready, Some(true));
        // The JSON round-trips with Kubernetes' field names.
        let json = serde_json::to_value(&slice).unwrap();
        assert_eq!(
            json["metadata"]["labels"]["kubernetes.io/service-name"],
            "web"
        );
        assert_eq!(json["addressType"], "IPv4");
        assert_eq!(
            serde_json::from_value::<EndpointSlice>(json).unwrap(),
            slice
        );
        assert!(std::mem::size_of::<Endpoint>() <= 32);
    }
}
