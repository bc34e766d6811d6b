//! The names the resolver answers itself: every Service as `<name>.<namespace>.svc.<domain>`
//! (its cluster IPs, or a headless service's ready endpoint addresses), and every host of a
//! ServiceEntry (its addresses). A pod may ask for a service in every form it can write
//! one (`svc`, `svc.ns`, `svc.ns.svc`, the full name) and with its search domains appended
//! by its stub resolver; each is answered from the one table.

use std::{collections::HashMap, net::IpAddr};

use crate::state::{CLUSTER_DOMAIN, MeshState};

/// The answerable names of one state.
#[derive(Debug, Default)]
pub struct Names {
    by_name: HashMap<Box<str>, Box<[IpAddr]>>,
}

impl Names {
    pub fn build(state: &MeshState) -> Self {
        let mut by_name: HashMap<Box<str>, Vec<IpAddr>> = HashMap::new();
        for (service, endpoints) in state.services_with_endpoints() {
            let addrs: Vec<IpAddr> = if service.vips.is_empty() {
                // Headless: the ready endpoints themselves.
                let mut ips: Vec<IpAddr> = endpoints.map(|e| e.ip()).collect();
                ips.sort();
                ips.dedup();
                ips
            } else {
                service.vips.clone()
            };
            // A name the mesh has no address for is not the mesh's to answer: a headless
            // service with no ready endpoint, or a ServiceEntry host of resolution NONE
            // without addresses (an egress declaration) resolves as the cluster DNS says.
            if addrs.is_empty() {
                continue;
            }
            let entry = by_name
                .entry(service.fqdn().to_ascii_lowercase().into())
                .or_default();
            entry.extend(addrs);
            entry.sort();
            entry.dedup();
        }
        Names {
            by_name: by_name
                .into_iter()
                .map(|(k, v)| (k, v.into_boxed_slice()))
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The addresses of `name` (lowercase, no final dot) asked by a pod of `namespace`, if
    /// the mesh knows it under any form a pod writes: the name itself, a service's short
    /// forms relative to the pod's namespace, and any of them followed by one of the pod's
    /// search domains (`<namespace>.svc.<domain>`, `svc.<domain>`, `<domain>`).
    pub fn lookup(&self, name: &str, namespace: &str) -> Option<&[IpAddr]> {
        if let Some(found) = self.expanded(name, namespace) {
            return Some(found);
        }
        let searches = [
            format!(".{namespace}.svc.{CLUSTER_DOMAIN}"),
            format!(".svc.{CLUSTER_DOMAIN}"),
            format!(".{CLUSTER_DOMAIN}"),
        ];
        searches
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix.as_str()))
            .find_map(|stem| self.expanded(stem, namespace))
    }

    /// `name` as written, else as a service's short form: `svc` (in the pod's namespace),
    /// `svc.ns`, `svc.ns.svc`.
    fn expanded(&self, name: &str, namespace: &str) -> Option<&[IpAddr]> {
        if let Some(found) = self.by_name.get(name) {
            return Some(found);
        }
        let full = match name.matches('.').count() {
            0 => format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}"),
            1 => format!("{name}.svc.{CLUSTER_DOMAIN}"),
            2 if name.ends_with(".svc") => format!("{name}.{CLUSTER_DOMAIN}"),
            _ => return None,
        };
        self.by_name.get(full.as_str()).map(|a| &**a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        Settings,
        file::load_str,
        translate::{NetnsSource, translate},
    };

    fn state(yaml: &str) -> MeshState {
        let objects = load_str(yaml, "test.yaml").unwrap();
        translate(
            &objects,
            "n1",
            NetnsSource::Annotation,
            &Settings::default(),
        )
        .unwrap()
    }

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec: {clusterIP: 10.96.0.20, ports: [{port: 9080}], selector: {app: reviews}}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: bookinfo}
spec: {clusterIP: None, ports: [{port: 5432}], selector: {app: db}}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: bookinfo, labels: {app: db}}
spec: {nodeName: n1}
status: {podIP: 10.1.0.5, phase: Running, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: bookinfo, labels: {app: db}}
spec: {nodeName: n1}
status: {podIP: 10.1.0.6, phase: Running, conditions: [{type: Ready, status: "True"}]}
"#;

    #[test]
    fn a_service_is_found_in_every_form_a_pod_writes() {
        let s = state(CLUSTER);
        let names = s.names();
        let vip: IpAddr = "10.96.0.20".parse().unwrap();
        for name in [
            "reviews",
            "reviews.bookinfo",
            "reviews.bookinfo.svc",
            "reviews.bookinfo.svc.cluster.local",
            // Search domains appended by the pod's stub resolver (ndots:5).
            "reviews.bookinfo.svc.cluster.local",
            "reviews.bookinfo.bookinfo.svc.cluster.local",
            "reviews.bookinfo.svc.bookinfo.svc.cluster.local",
            "reviews.bookinfo.svc.cluster.local.svc.cluster.local",
        ] {
            assert_eq!(names.lookup(name, "bookinfo"), Some(&[vip][..]), "{name}");
        }
        // The short form is relative to the asking pod's namespace.
        assert_eq!(names.lookup("reviews", "other"), None);
        assert_eq!(names.lookup("reviews.bookinfo", "other"), Some(&[vip][..]));
        for name in [
            "details",
            "reviews.other",
            "example.com",
            "reviews.bookinfo.svc.x",
        ] {
            assert_eq!(names.lookup(name, "bookinfo"), None, "{name}");
        }
    }

    #[test]
    fn a_name_without_addresses_is_left_to_the_server() {
        let yaml = format!(
            "{CLUSTER}---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: github, namespace: bookinfo}}\nspec: {{hosts: [api.github.com], resolution: NONE, ports: [{{number: 443, name: tls, protocol: TLS}}]}}\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: ext, namespace: bookinfo}}\nspec: {{hosts: [api.example.com], resolution: DNS, ports: [{{number: 443, name: tls, protocol: TLS}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: empty, namespace: bookinfo}}\nspec: {{clusterIP: None, ports: [{{port: 80}}], selector: {{app: nobody}}}}\n"
        );
        let s = state(&yaml);
        let names = s.names();
        assert_eq!(names.lookup("api.github.com", "bookinfo"), None);
        assert_eq!(names.lookup("empty", "bookinfo"), None);
        // Resolution DNS without addresses: one allocated, answered.
        let allocated = names.lookup("api.example.com", "bookinfo").unwrap();
        assert!(matches!(allocated, [IpAddr::V4(ip)] if ip.octets()[..2] == [240, 240]));
    }

    #[test]
    fn a_headless_service_is_its_ready_endpoints() {
        let s = state(CLUSTER);
        let found = s.names().lookup("db", "bookinfo").unwrap();
        let want: Vec<IpAddr> = ["10.1.0.5", "10.1.0.6"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(found, &want[..]);
    }
}
