//! `mesh-agent manifest generate [--profile minimal|default|demo]`: the Kubernetes objects
//! of an installation, as `istioctl manifest generate` prints them — the same objects
//! `kubectl kustomize deploy/DIR` gives (`agent` for `minimal`, else the profile's name),
//! because they are built from the same files: `deploy/` is embedded in the binary and its
//! kustomizations are evaluated here.
//!
//! Only what `deploy/` uses of kustomize is evaluated, and anything else is refused rather
//! than ignored: `resources` (files), `bases` (directories), `namespace` (set on every
//! namespaced object), `images` (a container image's name replaced by `newName:newTag`) and
//! `patchesStrategicMerge` (maps merged key by key; a list in a patch replaces the list). The
//! kernel-free test suite renders every profile with `kubectl kustomize` and requires the
//! same objects.
//!
//! Profiles: `minimal` is the node agents (DaemonSet, its RBAC, the Istio CRDs it reads);
//! `default` adds an ingress gateway in `istio-system`; `demo` adds Prometheus's scrape
//! annotations to every proxy and a waypoint for the namespace `demo`, which it labels for
//! ambient capture and for the waypoint.

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use serde_json::Value;

/// The profiles, each a kustomization under `deploy/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    Minimal,
    Default,
    Demo,
}

impl Profile {
    /// Its kustomization's directory, relative to `deploy/`.
    pub fn dir(self) -> &'static str {
        match self {
            Profile::Minimal => "agent",
            Profile::Default => "default",
            Profile::Demo => "demo",
        }
    }
}

macro_rules! embed {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_str!(concat!("../../deploy/", $path)))),*]
    };
}

/// Every YAML file under `deploy/`, by its path there (a test checks none is missing).
pub static FILES: &[(&str, &str)] = embed![
    "agent/kustomization.yaml",
    "agent/namespace.yaml",
    "agent/serviceaccount.yaml",
    "agent/clusterrole.yaml",
    "agent/clusterrolebinding.yaml",
    "agent/proxy-clusterrole.yaml",
    "agent/daemonset.yaml",
    "agent/crds/authorizationpolicies.security.istio.io.yaml",
    "agent/crds/destinationrules.networking.istio.io.yaml",
    "agent/crds/gateways.networking.istio.io.yaml",
    "agent/crds/peerauthentications.security.istio.io.yaml",
    "agent/crds/virtualservices.networking.istio.io.yaml",
    "gateway/kustomization.yaml",
    "gateway/deployment.yaml",
    "gateway/rbac.yaml",
    "gateway/service.yaml",
    "gateway/serviceaccount.yaml",
    "waypoint/kustomization.yaml",
    "waypoint/deployment.yaml",
    "waypoint/gateway.yaml",
    "waypoint/service.yaml",
    "waypoint/serviceaccount.yaml",
    "default/kustomization.yaml",
    "demo/kustomization.yaml",
    "demo/prometheus-scrape.yaml",
    "demo/waypoint/kustomization.yaml",
    "demo/waypoint/namespace.yaml",
    "demo/waypoint/rbac.yaml",
];

/// The objects of `profile`, in the order they can be applied (namespaces and CRDs first).
pub fn generate(profile: Profile) -> anyhow::Result<Vec<Value>> {
    let mut objects = build(profile.dir(), 0)?;
    objects.sort_by_key(|o| apply_rank(o["kind"].as_str().unwrap_or_default()));
    Ok(objects)
}

/// The objects as one multi-document YAML stream.
pub fn render(objects: &[Value]) -> anyhow::Result<String> {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(o)?);
    }
    Ok(out)
}

fn file(path: &str) -> anyhow::Result<&'static str> {
    FILES
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, text)| *text)
        .with_context(|| format!("deploy/{path} is not embedded in this binary"))
}

/// `dir/rel`, with `..` and `.` resolved (paths stay inside `deploy/`).
fn join(dir: &str, rel: &str) -> anyhow::Result<String> {
    let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
    for part in rel.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    bail!("deploy/{dir}: {rel} leaves deploy/");
                }
            }
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

fn documents(path: &str) -> anyhow::Result<Vec<Value>> {
    let text = file(path)?;
    let mut out = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let yaml = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(de)
            .with_context(|| format!("deploy/{path}: document {}", i + 1))?;
        if !yaml.is_null() {
            out.push(serde_json::to_value(yaml)?);
        }
    }
    Ok(out)
}

/// The fields of a kustomization this evaluator understands.
const KNOWN: &[&str] = &[
    "apiVersion",
    "kind",
    "resources",
    "bases",
    "namespace",
    "images",
    "patchesStrategicMerge",
];

fn strings<'a>(k: &'a Value, field: &str, at: &str) -> anyhow::Result<Vec<&'a str>> {
    match &k[field] {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .with_context(|| format!("{at}: {field}: expected paths"))
            })
            .collect(),
        _ => bail!("{at}: {field}: expected a list"),
    }
}

fn build(dir: &str, depth: usize) -> anyhow::Result<Vec<Value>> {
    if depth > 8 {
        bail!("deploy/{dir}: bases nested too deep (a cycle?)");
    }
    let at = format!("deploy/{dir}/kustomization.yaml");
    let k = documents(&join(dir, "kustomization.yaml")?)?
        .pop()
        .with_context(|| format!("{at}: empty"))?;
    if let Some(unknown) = k
        .as_object()
        .into_iter()
        .flat_map(|o| o.keys())
        .find(|key| !KNOWN.contains(&key.as_str()))
    {
        bail!("{at}: {unknown}: not supported by manifest generate");
    }
    let mut objects = Vec::new();
    for base in strings(&k, "bases", &at)? {
        objects.extend(build(&join(dir, base)?, depth + 1)?);
    }
    for resource in strings(&k, "resources", &at)? {
        objects.extend(documents(&join(dir, resource)?)?);
    }
    for patch in strings(&k, "patchesStrategicMerge", &at)? {
        for p in documents(&join(dir, patch)?)? {
            // As kustomize: by kind, name and namespace (none matches none).
            let id = |o: &Value| {
                let m = &o["metadata"];
                (o["kind"].clone(), m["name"].clone(), m["namespace"].clone())
            };
            let target = objects
                .iter_mut()
                .find(|o| id(o) == id(&p))
                .with_context(|| {
                    format!(
                        "{at}: {patch}: no {} {} in namespace {} to patch",
                        p["kind"], p["metadata"]["name"], p["metadata"]["namespace"]
                    )
                })?;
            merge(target, &p);
        }
    }
    if let Some(namespace) = k["namespace"].as_str() {
        for o in &mut objects {
            if !is_cluster_scoped(o["kind"].as_str().unwrap_or_default()) {
                o["metadata"]["namespace"] = namespace.into();
            }
        }
    }
    if let Some(images) = k["images"].as_array() {
        let images: BTreeMap<&str, String> = images
            .iter()
            .filter_map(|i| {
                let name = i["name"].as_str()?;
                let new = i["newName"].as_str().unwrap_or(name);
                Some((
                    name,
                    match i["newTag"].as_str() {
                        Some(tag) => format!("{new}:{tag}"),
                        None => new.to_owned(),
                    },
                ))
            })
            .collect();
        for o in &mut objects {
            set_images(o, &images);
        }
    }
    Ok(objects)
}

/// Maps merged key by key (`null` deletes); anything else replaced.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (key, value) in p {
                if value.is_null() {
                    t.remove(key);
                } else {
                    merge(t.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn set_images(object: &mut Value, images: &BTreeMap<&str, String>) {
    // `pointer_mut`, not indexing: indexing a map inserts what is missing.
    let Some(spec) = object.pointer_mut("/spec/template/spec") else {
        return;
    };
    for list in ["containers", "initContainers"] {
        let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) else {
            continue;
        };
        for c in containers {
            let Some(image) = c["image"].as_str() else {
                continue;
            };
            let name = image.split(['@', ':']).next().unwrap_or(image);
            if let Some(new) = images.get(name) {
                c["image"] = new.clone().into();
            }
        }
    }
}

fn is_cluster_scoped(kind: &str) -> bool {
    matches!(
        kind,
        "Namespace"
            | "CustomResourceDefinition"
            | "ClusterRole"
            | "ClusterRoleBinding"
            | "GatewayClass"
            | "PriorityClass"
    )
}

/// What must exist before what uses it: namespaces, CRDs, identities and their rights, then
/// the workloads, then the objects of the CRDs.
fn apply_rank(kind: &str) -> usize {
    const ORDER: &[&str] = &[
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "Role",
        "ClusterRole",
        "RoleBinding",
        "ClusterRoleBinding",
        "ConfigMap",
        "Secret",
        "Service",
        "Deployment",
        "DaemonSet",
    ];
    ORDER.iter().position(|k| *k == kind).unwrap_or(ORDER.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
    }

    #[test]
    fn every_profile_builds_from_embedded_files() {
        for profile in [Profile::Minimal, Profile::Default, Profile::Demo] {
            let objects = generate(profile).unwrap();
            assert!(
                find(&objects, "DaemonSet", "mesh-agent").is_some(),
                "{profile:?}"
            );
            assert_eq!(objects[0]["kind"], "Namespace", "{profile:?}");
            assert!(render(&objects).unwrap().starts_with("---\n"));
        }
    }

    #[test]
    fn profiles_add_the_gateway_then_the_waypoint_and_scrape_annotations() {
        let minimal = generate(Profile::Minimal).unwrap();
        let default = generate(Profile::Default).unwrap();
        let demo = generate(Profile::Demo).unwrap();
        let gateway = |o: &[Value]| find(o, "Deployment", "istio-ingressgateway").cloned();
        assert!(gateway(&minimal).is_none());
        assert_eq!(
            gateway(&default).unwrap()["metadata"]["namespace"],
            "istio-system"
        );
        assert!(find(&default, "Gateway", "waypoint").is_none());
        let waypoint = find(&demo, "Gateway", "waypoint").unwrap();
        assert_eq!(waypoint["metadata"]["namespace"], "demo");
        let ns = find(&demo, "Namespace", "demo").unwrap();
        assert_eq!(
            ns["metadata"]["labels"]["istio.io/dataplane-mode"],
            "ambient"
        );
        assert_eq!(
            ns["metadata"]["labels"]["istio.io/use-waypoint"],
            "waypoint"
        );
        for (kind, name) in [
            ("DaemonSet", "mesh-agent"),
            ("Deployment", "istio-ingressgateway"),
            ("Deployment", "waypoint"),
        ] {
            let annotations =
                &find(&demo, kind, name).unwrap()["spec"]["template"]["metadata"]["annotations"];
            assert_eq!(annotations["prometheus.io/scrape"], "true", "{kind} {name}");
            assert_eq!(annotations["prometheus.io/port"], "15020", "{kind} {name}");
        }
        let ds = find(&minimal, "DaemonSet", "mesh-agent").unwrap();
        assert!(
            ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"].is_null()
        );
    }

    #[test]
    fn paths_resolve_inside_deploy_only() {
        assert_eq!(join("demo", "../gateway").unwrap(), "gateway");
        assert_eq!(
            join("demo/waypoint", "./rbac.yaml").unwrap(),
            "demo/waypoint/rbac.yaml"
        );
        assert!(join("demo", "../../etc").is_err());
    }

    #[test]
    fn merge_is_by_key_and_null_deletes() {
        let mut target = serde_json::json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge(
            &mut target,
            &serde_json::json!({"a": {"c": 3, "b": null}, "l": [9]}),
        );
        assert_eq!(target, serde_json::json!({"a": {"c": 3}, "l": [9]}));
    }

    #[test]
    fn images_are_replaced_by_name_and_nothing_else_is_added() {
        let mut role = serde_json::json!({"kind": "ClusterRole", "rules": []});
        set_images(&mut role, &[("mesh-agent", "x".to_owned())].into());
        assert_eq!(
            role,
            serde_json::json!({"kind": "ClusterRole", "rules": []})
        );
        let mut o = serde_json::json!({"spec": {"template": {"spec": {
            "containers": [{"image": "mesh-agent"}, {"image": "other:1"}],
            "initContainers": [{"image": "mesh-agent:old"}]}}}});
        let images = [("mesh-agent", "registry/mesh-agent:0.2".to_owned())].into();
        set_images(&mut o, &images);
        let spec = &o["spec"]["template"]["spec"];
        assert_eq!(spec["containers"][0]["image"], "registry/mesh-agent:0.2");
        assert_eq!(spec["containers"][1]["image"], "other:1");
        assert_eq!(
            spec["initContainers"][0]["image"],
            "registry/mesh-agent:0.2"
        );
    }
}
