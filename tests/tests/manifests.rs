//! The Kubernetes manifests under deploy/: every YAML document parses as its k8s-openapi
//! type without losing a field (a typo or a misplaced field fails the round trip), the
//! DaemonSet agrees with the agent (ports, probes, `run` flags, mounts, capabilities), the
//! ClusterRole is least-privilege, and the CRDs are Istio's (group, versions, kinds, names)
//! with a schema that accepts Istio's documented objects. No cluster is involved: what an
//! API server would additionally check (CEL rules, admission) is not tested here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    Container, Namespace, PodSpec, Probe, Service as K8sService, ServiceAccount, Volume,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_agent::ebpf::DEFAULT_PIN_DIR;
use mesh_agent::identity::ca::{ROOT_CERT_FILE, ROOT_KEY_FILE};
use mesh_common::{ADMIN_PORT, METRICS_PORT, READINESS_PORT};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tests::locate_binary;

const NAMESPACE: &str = "mesh-system";
const AGENT_CONTAINER: &str = "mesh-agent";
const CA_SECRET: &str = "mesh-agent-ca";
const SECURITY_GROUP: &str = "security.istio.io";
const NETWORKING_GROUP: &str = "networking.istio.io";
/// A waypoint's manifests: their own kustomization, applied per namespace.
const WAYPOINT_DIR: &str = "waypoint";
const GATEWAY_DIR: &str = "gateway";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .join("deploy")
}

/// One YAML document: where it is and its content as JSON.
struct Doc {
    file: String,
    index: usize,
    value: Value,
}

impl Doc {
    fn at(&self) -> String {
        format!("{} (document {})", self.file, self.index + 1)
    }
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

/// The node agents' kustomization (profile `minimal`).
fn agent_dir() -> PathBuf {
    deploy_dir().join("agent")
}

/// The YAML files of the node agent's kustomization: everything under deploy/agent.
fn agent_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    yaml_files(&agent_dir(), &mut files);
    files
}

/// Every document of the node agent's manifests.
fn documents() -> Vec<Doc> {
    documents_of(agent_files())
}

/// Every document under `dir`.
fn documents_under(dir: &Path) -> Vec<Doc> {
    let mut files = Vec::new();
    yaml_files(dir, &mut files);
    documents_of(files)
}

fn documents_of(files: Vec<PathBuf>) -> Vec<Doc> {
    let root = deploy_dir();
    assert!(!files.is_empty(), "no YAML under {}", root.display());
    let mut docs = Vec::new();
    for path in files {
        let file = path
            .strip_prefix(root.parent().unwrap())
            .unwrap()
            .display()
            .to_string();
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        for (index, de) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let yaml = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(de)
                .unwrap_or_else(|e| panic!("{file} (document {}): {e}", index + 1));
            if yaml.is_null() {
                continue;
            }
            let value = serde_json::to_value(&yaml)
                .unwrap_or_else(|e| panic!("{file} (document {}): {e}", index + 1));
            docs.push(Doc {
                file: file.clone(),
                index,
                value,
            });
        }
    }
    docs
}

/// The first place where two JSON values differ, as a path (`spec.template.spec...`).
fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match (x.get(k), y.get(k)) {
                    (Some(u), Some(v)) => first_difference(u, v, &p),
                    _ => Some(p),
                }
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (u, v))| first_difference(u, v, &format!("{path}[{i}]"))),
        // k8s-openapi holds a schema's `minimum` and `maximum` as f64: 0 comes back as 0.0.
        (Value::Number(x), Value::Number(y)) => (x.as_f64() != y.as_f64()).then(|| path.to_owned()),
        _ => (a != b).then(|| path.to_owned()),
    }
}

/// Parses a document as `T` and fails if anything in it is not part of `T`.
fn typed<T: DeserializeOwned + Serialize>(doc: &Doc) -> T {
    let type_name = std::any::type_name::<T>().rsplit("::").next().unwrap();
    let obj: T = serde_json::from_value(doc.value.clone())
        .unwrap_or_else(|e| panic!("{}: not a valid {type_name}: {e}", doc.at()));
    let back = serde_json::to_value(&obj).expect("serialising a k8s-openapi object");
    if let Some(path) = first_difference(&doc.value, &back, "") {
        panic!(
            "{}: `{path}` is not a field of {type_name} there (a typo or a misplaced field): \
             it does not survive a round trip through k8s-openapi",
            doc.at()
        );
    }
    obj
}

/// Every manifest of deploy/, typed.
#[derive(Default)]
struct Manifests {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    daemonsets: Vec<DaemonSet>,
    crds: Vec<CustomResourceDefinition>,
    /// (file, content) of each kustomization.
    kustomizations: Vec<(String, Value)>,
}

fn load() -> Manifests {
    let mut m = Manifests::default();
    for doc in documents() {
        let api_version = doc.value["apiVersion"].as_str().unwrap_or_default();
        let kind = doc.value["kind"].as_str().unwrap_or_default();
        match (api_version, kind) {
            ("v1", "Namespace") => m.namespaces.push(typed(&doc)),
            ("v1", "ServiceAccount") => m.service_accounts.push(typed(&doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => m.cluster_roles.push(typed(&doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => m.bindings.push(typed(&doc)),
            ("apps/v1", "DaemonSet") => m.daemonsets.push(typed(&doc)),
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => m.crds.push(typed(&doc)),
            ("kustomize.config.k8s.io/v1beta1", "Kustomization") => {
                m.kustomizations.push((doc.file.clone(), doc.value))
            }
            other => panic!(
                "{}: {other:?} is not checked by this test: add it to `load`",
                doc.at()
            ),
        }
    }
    m
}

/// The ClusterRole called `name`.
fn cluster_role<'a>(m: &'a Manifests, name: &str) -> &'a ClusterRole {
    m.cluster_roles
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no ClusterRole {name} under deploy/"))
}

/// What every reader of the configuration (the agents' and the L7 proxies' watchers) lists
/// and watches: (API group, resource).
const WATCHED: [(&str, &str); 13] = [
    ("", "namespaces"),
    ("", "pods"),
    ("", "services"),
    ("discovery.k8s.io", "endpointslices"),
    (SECURITY_GROUP, "authorizationpolicies"),
    (SECURITY_GROUP, "peerauthentications"),
    ("gateway.networking.k8s.io", "gateways"),
    ("gateway.networking.k8s.io", "httproutes"),
    ("gateway.networking.k8s.io", "grpcroutes"),
    (NETWORKING_GROUP, "virtualservices"),
    (NETWORKING_GROUP, "destinationrules"),
    (NETWORKING_GROUP, "gateways"),
    (NETWORKING_GROUP, "serviceentries"),
];

/// (group, resource, verb) of every rule, checked for wildcards and non-resource URLs.
fn grants(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    let mut granted = BTreeSet::new();
    for rule in rules {
        assert!(rule.non_resource_urls.is_none(), "no non-resource URLs");
        let groups = rule.api_groups.clone().unwrap_or_default();
        let resources = rule.resources.clone().unwrap_or_default();
        for x in groups.iter().chain(&resources).chain(&rule.verbs) {
            assert!(!x.contains('*'), "no wildcards: {rule:?}");
        }
        assert!(rule.resource_names.is_none(), "{rule:?}");
        for verb in &rule.verbs {
            for g in &groups {
                for r in &resources {
                    granted.insert((g.clone(), r.clone(), verb.clone()));
                }
            }
        }
    }
    granted
}

fn one<'a, T>(items: &'a [T], what: &str) -> &'a T {
    assert_eq!(items.len(), 1, "expected exactly one {what} under deploy/");
    &items[0]
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("the DaemonSet has a pod template")
}

fn agent_container(ds: &DaemonSet) -> &Container {
    pod_spec(ds)
        .containers
        .iter()
        .find(|c| c.name == AGENT_CONTAINER)
        .unwrap_or_else(|| panic!("the DaemonSet has no container {AGENT_CONTAINER:?}"))
}

fn args(c: &Container) -> &[String] {
    c.args.as_deref().unwrap_or_default()
}

/// The value after `--flag` (or in `--flag=value`).
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(flag)?.strip_prefix('=')
        }
    })
}

fn volume<'a>(spec: &'a PodSpec, name: &str) -> &'a Volume {
    spec.volumes
        .iter()
        .flatten()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no volume {name:?}"))
}

/// The container's mount path of the hostPath volume for `host_path`, with its propagation.
fn host_mount<'a>(
    spec: &'a PodSpec,
    c: &'a Container,
    host_path: &str,
) -> (&'a str, Option<&'a str>) {
    let vol = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.host_path.as_ref().is_some_and(|h| h.path == host_path))
        .unwrap_or_else(|| panic!("no hostPath volume for {host_path}"));
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == vol.name)
        .unwrap_or_else(|| panic!("container {} does not mount {host_path}", c.name));
    (
        mount.mount_path.as_str(),
        mount.mount_propagation.as_deref(),
    )
}

fn http_get(probe: Option<&Probe>, what: &str) -> (i32, String, Option<String>) {
    let get = probe
        .and_then(|p| p.http_get.as_ref())
        .unwrap_or_else(|| panic!("the agent container has no HTTP {what} probe"));
    let port = match &get.port {
        IntOrString::Int(p) => *p,
        IntOrString::String(name) => panic!("{what} probe: use the port number, not {name:?}"),
    };
    (port, get.path.clone().unwrap_or_default(), get.host.clone())
}

// ---- tests ----

#[test]
fn every_manifest_parses_as_its_kubernetes_type() {
    let m = load();
    assert_eq!(
        one(&m.namespaces, "Namespace").metadata.name.as_deref(),
        Some(NAMESPACE)
    );
    one(&m.service_accounts, "ServiceAccount");
    assert_eq!(m.cluster_roles.len(), 2, "the agent's and the L7 proxies'");
    cluster_role(&m, "mesh-agent");
    cluster_role(&m, "mesh-proxy");
    one(&m.bindings, "ClusterRoleBinding");
    one(&m.daemonsets, "DaemonSet");
    assert_eq!(
        m.crds.len(),
        5,
        "the AuthorizationPolicy, PeerAuthentication, VirtualService, DestinationRule and Gateway CRDs"
    );
    one(&m.kustomizations, "kustomization");
}

#[test]
fn kustomization_lists_every_manifest_and_the_namespace_matches() {
    let m = load();
    let (file, k) = one(&m.kustomizations, "kustomization");
    assert_eq!(k["namespace"], NAMESPACE, "{file}");
    let listed: BTreeSet<String> = k["resources"]
        .as_array()
        .unwrap_or_else(|| panic!("{file}: no resources"))
        .iter()
        .map(|r| r.as_str().expect("resource paths are strings").to_owned())
        .collect();
    let root = agent_dir();
    let present: BTreeSet<String> = agent_files()
        .iter()
        .map(|p| p.strip_prefix(&root).unwrap().display().to_string())
        .filter(|p| p != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed, present,
        "{file}: resources must be every manifest under deploy/agent"
    );

    // Namespaced objects say the namespace themselves too (usable with `kubectl apply -f`).
    let ds = one(&m.daemonsets, "DaemonSet");
    let sa = one(&m.service_accounts, "ServiceAccount");
    assert_eq!(ds.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(sa.metadata.namespace.as_deref(), Some(NAMESPACE));

    // Every container runs the image the kustomization names.
    let image = k["images"][0]["name"].as_str().expect("an images entry");
    let spec = pod_spec(ds);
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        assert_eq!(c.image.as_deref(), Some(image), "container {}", c.name);
    }
}

#[test]
fn daemonset_probes_and_ports_are_the_agents() {
    let m = load();
    let ds = one(&m.daemonsets, "DaemonSet");
    let c = agent_container(ds);

    let (port, path, host) = http_get(c.readiness_probe.as_ref(), "readiness");
    assert_eq!(
        (port, path.as_str()),
        (i32::from(READINESS_PORT), "/healthz/ready")
    );
    // The agent serves readiness on every node address, loopback included; kubelet shares
    // the node's network namespace with the host-network agent and probes loopback.
    assert_eq!(host.as_deref(), Some("127.0.0.1"), "readiness probe host");

    let (port, path, host) = http_get(c.liveness_probe.as_ref(), "liveness");
    let served = [
        (i32::from(READINESS_PORT), "/healthz/live"),
        (i32::from(READINESS_PORT), "/healthz/ready"),
        (i32::from(METRICS_PORT), "/metrics"),
        (i32::from(ADMIN_PORT), "/config_dump"),
    ];
    assert!(
        served.contains(&(port, path.as_str())),
        "liveness probe {port} {path} is not an endpoint the agent serves"
    );
    assert_eq!(host.as_deref(), Some("127.0.0.1"), "liveness probe host");

    // A declared port of a host-network pod is a host port: the surge pod of a rollout
    // could not be placed beside the old one.
    assert!(
        c.ports.as_deref().unwrap_or_default().is_empty()
            && pod_spec(ds).host_network == Some(true),
        "the host-network agent declares ports: {:?}",
        c.ports
    );
}

/// `mesh-agent <subcommand> --help`, from the built binary.
fn help_of(subcommand: &str) -> String {
    let bin = locate_binary("mesh-agent", "MESH_AGENT_BIN")
        .expect("the mesh-agent binary (cargo build --bins, or MESH_AGENT_BIN)");
    let out = Command::new(&bin)
        .args([subcommand, "--help"])
        .output()
        .unwrap_or_else(|e| panic!("running {} {subcommand} --help: {e}", bin.display()));
    assert!(
        out.status.success(),
        "{} {subcommand} --help: {}",
        bin.display(),
        out.status
    );
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

/// `mesh-agent run --help`.
fn run_help() -> String {
    help_of("run")
}

fn help_mentions(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(i, _)| {
        !help[i + flag.len()..]
            .starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

#[test]
fn daemonset_args_use_only_flags_the_binary_accepts() {
    let m = load();
    let ds = one(&m.daemonsets, "DaemonSet");
    let c = agent_container(ds);
    let args = args(c);
    assert_eq!(
        args.first().map(String::as_str),
        Some("run"),
        "the agent runs `run`"
    );
    let help = run_help();
    for arg in args.iter().filter(|a| a.starts_with("--")) {
        let flag = arg.split('=').next().unwrap();
        assert!(
            help_mentions(&help, flag),
            "`mesh-agent run` does not accept {flag}:\n{help}"
        );
    }
    // `$(VAR)` in args is expanded by kubelet only for variables the container defines.
    let env: BTreeSet<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    for arg in args {
        for part in arg.split("$(").skip(1) {
            let var = part.split(')').next().unwrap();
            assert!(
                env.contains(var),
                "{arg} refers to ${var}, which the container does not define"
            );
        }
    }
    let node = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(
        node,
        Some("spec.nodeName"),
        "NODE_NAME comes from the downward API"
    );
}

/// The kustomization `k` of deploy/`dir` lists every other YAML file of that directory.
fn kustomization_lists_its_directory(k: &Value, dir: &str) {
    let root = deploy_dir().join(dir);
    let mut files = Vec::new();
    yaml_files(&root, &mut files);
    let present: BTreeSet<String> = files
        .iter()
        .map(|p| p.strip_prefix(&root).unwrap().display().to_string())
        .filter(|p| p != "kustomization.yaml")
        .collect();
    let listed: BTreeSet<String> = k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, present, "deploy/{dir}/kustomization.yaml");
}

/// Every flag `help` says is required is in `args`, or in `env` through the variable the
/// help names for it.
fn required_flags_given(help: &str, args: &[String], env: &BTreeSet<&str>, what: &str) {
    for flag in required_flags(help) {
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with(&flag))
            .unwrap_or_else(|| panic!("{flag} not described:\n{help}"));
        let from_env = line
            .split("[env: ")
            .nth(1)
            .and_then(|rest| rest.split('=').next())
            .or_else(|| {
                let i = help.find(line)?;
                help[i..].split("[env: ").nth(1)?.split('=').next()
            });
        assert!(
            flag_value(args, &flag).is_some() || from_env.is_some_and(|v| env.contains(v)),
            "{what} needs {flag}"
        );
    }
}

/// What the usage line of `run --help` requires (`--flag <VALUE>` outside `[...]`).
fn required_flags(help: &str) -> Vec<String> {
    let usage = help
        .lines()
        .find(|l| l.trim_start().starts_with("Usage:"))
        .expect("a usage line");
    let mut depth = 0;
    let mut out = Vec::new();
    for word in usage.split_whitespace() {
        if depth == 0 && word.starts_with("--") {
            out.push(word.trim_end_matches(']').to_owned());
        }
        depth += word.matches('[').count();
        depth -= word.matches(']').count().min(depth);
    }
    out
}

#[test]
fn daemonset_args_supply_every_flag_run_requires() {
    let m = load();
    let c = agent_container(one(&m.daemonsets, "DaemonSet"));
    let args = args(c);
    let required = required_flags(&run_help());
    for flag in required {
        assert!(
            flag_value(args, &flag).is_some(),
            "`mesh-agent run` requires {flag}, which the DaemonSet does not pass (kube mode \
             takes its configuration from the API server: the kube config source must make \
             {flag} optional, or the DaemonSet must pass it)"
        );
    }
}

#[test]
fn daemonset_runs_on_every_node_in_the_host_namespaces_it_needs() {
    let m = load();
    let ds = one(&m.daemonsets, "DaemonSet");
    let spec = pod_spec(ds);
    assert_eq!(spec.host_network, Some(true), "hostNetwork");
    assert_eq!(
        spec.host_pid,
        Some(true),
        "hostPID (pod namespaces are found from /proc)"
    );
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(spec.termination_grace_period_seconds.is_some());
    assert!(
        spec.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "a toleration of every taint"
    );
    let update = ds
        .spec
        .as_ref()
        .unwrap()
        .update_strategy
        .as_ref()
        .expect("updateStrategy");
    assert_eq!(update.type_.as_deref(), Some("RollingUpdate"));
    // The new agent starts beside the old one and takes its listeners over (ADR 014).
    let rolling = update.rolling_update.as_ref().expect("rollingUpdate");
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    // The old agent drains on through the pod's SIGTERM: the grace period outlasts it.
    let args = args(agent_container(ds));
    // What the DaemonSet passes, else the agent's default (in seconds, e.g. `30s`).
    let help = help_of("run");
    let default = help
        .split_once("--drain-period")
        .and_then(|(_, rest)| rest.split_once("[default: "))
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(value, _)| value.to_owned())
        .expect("--drain-period's default in `mesh-agent run --help`");
    let drain: i64 = flag_value(args, "--drain-period")
        .unwrap_or(&default)
        .strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .expect("--drain-period in seconds");
    let grace = pod_spec(ds)
        .termination_grace_period_seconds
        .expect("terminationGracePeriodSeconds");
    assert!(grace > drain, "grace period {grace} s, drain {drain} s");

    // The selector selects the template.
    let selector = ds
        .spec
        .as_ref()
        .unwrap()
        .selector
        .match_labels
        .clone()
        .unwrap_or_default();
    let labels = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    assert!(!selector.is_empty());
    assert!(
        selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "selector {selector:?} vs labels {labels:?}"
    );
    // Kiali (and Istio) tell a node proxy's pods by `app: ztunnel`; the selector does not
    // use it.
    assert_eq!(labels.get("app").map(String::as_str), Some("ztunnel"));
    assert!(!selector.contains_key("app"), "{selector:?}");

    let c = agent_container(ds);
    let resources = c.resources.as_ref().expect("resources");
    let quantity =
        |map: &Option<
            BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
        >,
         key: &str| { map.as_ref().and_then(|m| m.get(key)).map(|q| q.0.clone()) };
    assert_eq!(
        quantity(&resources.requests, "cpu").as_deref(),
        Some("100m")
    );
    assert_eq!(
        quantity(&resources.requests, "memory").as_deref(),
        Some("64Mi")
    );
    assert_eq!(
        quantity(&resources.limits, "memory").as_deref(),
        Some("256Mi")
    );
}

#[test]
fn daemonset_mounts_bpffs_cgroup_proc_netns_and_the_ca() {
    let m = load();
    let ds = one(&m.daemonsets, "DaemonSet");
    let spec = pod_spec(ds);
    let c = agent_container(ds);
    let args = args(c);

    // bpffs: the pin directory lies in it, and the mount follows the host's.
    let (bpf, propagation) = host_mount(spec, c, "/sys/fs/bpf");
    assert_eq!(bpf, "/sys/fs/bpf");
    assert!(
        matches!(propagation, Some("HostToContainer" | "Bidirectional")),
        "bpffs propagation {propagation:?}"
    );
    let pin_dir = flag_value(args, "--bpffs-dir").unwrap_or(DEFAULT_PIN_DIR);
    assert!(
        pin_dir.starts_with(&format!("{bpf}/")),
        "pin dir {pin_dir} outside {bpf}"
    );
    // Something mounts bpffs through to the host when it is missing there.
    assert!(
        spec.init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
            .any(|c| {
                c.volume_mounts.iter().flatten().any(|m| {
                    m.mount_path == "/sys/fs/bpf"
                        && m.mount_propagation.as_deref() == Some("Bidirectional")
                })
            }),
        "no container can mount bpffs on the host (Bidirectional /sys/fs/bpf)"
    );

    // The cgroup v2 root the capture programs attach to is the host's, passed explicitly.
    let (cgroup, _) = host_mount(spec, c, "/sys/fs/cgroup");
    assert_eq!(
        flag_value(args, "--cgroup"),
        Some(cgroup),
        "--cgroup names the host cgroup mount"
    );

    let (proc, _) = host_mount(spec, c, "/proc");
    assert_eq!(proc, "/host/proc");
    // The container's /proc/sys is read-only: enrollment writes sysctls through the host's.
    assert_eq!(
        flag_value(args, "--proc-root"),
        Some(proc),
        "--proc-root names the host procfs mount"
    );
    let proc_mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == proc)
        .expect("the host procfs mount");
    assert_ne!(
        proc_mount.read_only,
        Some(true),
        "sysctls are written through {proc}"
    );
    let (netns, _) = host_mount(spec, c, "/run/netns");
    assert_eq!(netns, "/run/netns");
    // The handoff socket lies in a host directory: a new agent's pod finds the old one's.
    let handoff = flag_value(args, "--handoff-socket").expect("--handoff-socket");
    let (run, _) = host_mount(spec, c, "/var/run/mesh-agent");
    assert_eq!(
        Path::new(handoff).parent(),
        Some(Path::new(run)),
        "--handoff-socket {handoff} outside the host directory mounted at {run}"
    );

    // The CA: the Secret's two keys, where --ca-dir points.
    let ca_dir = flag_value(args, "--ca-dir").expect("--ca-dir");
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == ca_dir)
        .unwrap_or_else(|| panic!("nothing is mounted at --ca-dir {ca_dir}"));
    assert_eq!(mount.read_only, Some(true));
    let secret = volume(spec, &mount.name)
        .secret
        .as_ref()
        .expect("the CA is a Secret volume");
    assert_eq!(secret.secret_name.as_deref(), Some(CA_SECRET));
    let keys: BTreeSet<(&str, &str)> = secret
        .items
        .iter()
        .flatten()
        .map(|i| (i.key.as_str(), i.path.as_str()))
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            (ROOT_CERT_FILE, ROOT_CERT_FILE),
            (ROOT_KEY_FILE, ROOT_KEY_FILE)
        ])
    );

    // Every mount has its volume and every volume is mounted.
    let mounted: BTreeSet<&str> = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.volume_mounts.iter().flatten().map(|m| m.name.as_str()))
        .collect();
    let volumes: BTreeSet<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(mounted, volumes);
}

#[test]
fn daemonset_security_context_is_capabilities_not_privileged() {
    let m = load();
    let ds = one(&m.daemonsets, "DaemonSet");
    let spec = pod_spec(ds);
    let c = agent_container(ds);
    let sc = c.security_context.as_ref().expect("a securityContext");
    assert_ne!(
        sc.privileged,
        Some(true),
        "the agent runs with capabilities, not privileged"
    );
    let caps = sc.capabilities.as_ref().expect("capabilities");
    let add: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    for cap in ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"] {
        assert!(add.contains(cap), "capability {cap} missing: {add:?}");
    }
    assert!(
        caps.drop.iter().flatten().any(|d| d == "ALL"),
        "the runtime's default capabilities are dropped"
    );

    // What the API server's validation rejects (apis/core/validation):
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        let sc = c.security_context.as_ref();
        let privileged = sc.and_then(|s| s.privileged) == Some(true);
        for m in c.volume_mounts.iter().flatten() {
            assert!(
                privileged || m.mount_propagation.as_deref() != Some("Bidirectional"),
                "container {}: Bidirectional propagation ({}) is allowed only in privileged containers",
                c.name,
                m.mount_path
            );
        }
        let no_escalation = sc.and_then(|s| s.allow_privilege_escalation) == Some(false);
        let sys_admin = sc
            .and_then(|s| s.capabilities.as_ref())
            .is_some_and(|caps| caps.add.iter().flatten().any(|a| a == "SYS_ADMIN"));
        assert!(
            !(no_escalation && (privileged || sys_admin)),
            "container {}: allowPrivilegeEscalation: false with privileged or SYS_ADMIN is rejected",
            c.name
        );
    }
}

#[test]
fn rbac_grants_only_reads_and_patching_pods_to_the_agents_account() {
    let m = load();
    let role = cluster_role(&m, "mesh-agent");
    let read = ["get", "list", "watch"];
    let granted = grants(role.rules.as_deref().unwrap_or_default());
    for (g, r, verb) in &granted {
        assert!(
            read.contains(&verb.as_str()) || (verb == "patch" && g.is_empty() && r == "pods"),
            "verb {verb:?} on {g:?}/{r:?}: only get/list/watch, and patch on pods"
        );
    }
    // And what the agent's watchers need is there.
    for (g, r) in WATCHED {
        for verb in read {
            assert!(
                granted.contains(&(g.into(), r.into(), verb.into())),
                "{verb} on {g}/{r} is not granted"
            );
        }
    }
    assert!(granted.contains(&(String::new(), "pods".into(), "patch".into())));

    let binding = one(&m.bindings, "ClusterRoleBinding");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let sa = one(&m.service_accounts, "ServiceAccount");
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
    let ds = one(&m.daemonsets, "DaemonSet");
    assert_eq!(
        pod_spec(ds).service_account_name.as_ref(),
        sa.metadata.name.as_ref()
    );
}

/// The L7 proxies' ClusterRole: exactly get/list/watch on what the watchers read, no
/// write, no secret (bound by the gateway's and, per namespace, the waypoints' accounts).
#[test]
fn the_proxies_role_reads_what_their_watchers_need_and_nothing_else() {
    let m = load();
    let role = cluster_role(&m, "mesh-proxy");
    let granted = grants(role.rules.as_deref().unwrap_or_default());
    let wanted: BTreeSet<(String, String, String)> = WATCHED
        .iter()
        .flat_map(|(g, r)| {
            ["get", "list", "watch"].map(|v| (g.to_string(), r.to_string(), v.to_owned()))
        })
        .collect();
    assert_eq!(granted, wanted);
    // Bound here to nobody: the agent's binding names the agent's role only.
    assert!(
        m.bindings.iter().all(|b| b.role_ref.name != "mesh-proxy"),
        "the base binds mesh-proxy to no one"
    );
}

// ---- CRDs ----

fn crd<'a>(m: &'a Manifests, kind: &str) -> &'a CustomResourceDefinition {
    m.crds
        .iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"))
}

/// The schema of `spec` (identical in every version: checked).
fn spec_schema(crd: &CustomResourceDefinition) -> JSONSchemaProps {
    let schemas: Vec<&JSONSchemaProps> = crd
        .spec
        .versions
        .iter()
        .map(|v| {
            v.schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .unwrap_or_else(|| panic!("{} {} has no schema", crd.spec.names.kind, v.name))
        })
        .collect();
    assert!(
        schemas.windows(2).all(|w| w[0] == w[1]),
        "versions of {} differ",
        crd.spec.names.kind
    );
    schemas[0]
        .properties
        .as_ref()
        .and_then(|p| p.get("spec"))
        .cloned()
        .expect("a spec schema")
}

fn props(s: &JSONSchemaProps) -> &BTreeMap<String, JSONSchemaProps> {
    s.properties
        .as_ref()
        .expect("an object schema with properties")
}

fn items(s: &JSONSchemaProps) -> &JSONSchemaProps {
    match s.items.as_ref().expect("an array schema") {
        JSONSchemaPropsOrArray::Schema(s) => s,
        JSONSchemaPropsOrArray::Schemas(_) => panic!("tuple arrays are not used"),
    }
}

/// The schema at a path like `rules[].from[].source.principals`.
fn at<'a>(root: &'a JSONSchemaProps, path: &str) -> &'a JSONSchemaProps {
    let mut s = root;
    for part in path.split('.') {
        let (name, arrays) = (part.trim_end_matches("[]"), part.matches("[]").count());
        s = props(s)
            .get(name)
            .unwrap_or_else(|| panic!("no field {name} on the way to {path}"));
        for _ in 0..arrays {
            s = items(s);
        }
    }
    s
}

fn enum_values(s: &JSONSchemaProps) -> Vec<String> {
    s.enum_
        .iter()
        .flatten()
        .map(|v| v.0.as_str().expect("string enum").to_owned())
        .collect()
}

fn string_list(s: &JSONSchemaProps) -> bool {
    s.type_.as_deref() == Some("array") && items(s).type_.as_deref() == Some("string")
}

#[test]
fn crds_are_istios_group_versions_kinds_and_names() {
    let m = load();
    // Istio serves v1 and v1beta1 of its security kinds and stores v1beta1; it serves v1,
    // v1alpha3 and v1beta1 of its networking kinds and stores v1 (see
    // xtask/src/manifests.rs). The schemas of a kind's versions are the same.
    let security = [("v1", true, false), ("v1beta1", true, true)];
    let networking = [
        ("v1", true, true),
        ("v1alpha3", true, false),
        ("v1beta1", true, false),
    ];
    for (group, kind, plural, singular, short, columns) in [
        (
            SECURITY_GROUP,
            "AuthorizationPolicy",
            "authorizationpolicies",
            "authorizationpolicy",
            "ap",
            &[("Action", ".spec.action")][..],
        ),
        (
            SECURITY_GROUP,
            "PeerAuthentication",
            "peerauthentications",
            "peerauthentication",
            "pa",
            &[("Mode", ".spec.mtls.mode")][..],
        ),
        (
            NETWORKING_GROUP,
            "VirtualService",
            "virtualservices",
            "virtualservice",
            "vs",
            &[("Gateways", ".spec.gateways"), ("Hosts", ".spec.hosts")][..],
        ),
        (
            NETWORKING_GROUP,
            "DestinationRule",
            "destinationrules",
            "destinationrule",
            "dr",
            &[("Host", ".spec.host")][..],
        ),
    ] {
        let c = crd(&m, kind);
        assert_eq!(
            c.metadata.name.as_deref(),
            Some(format!("{plural}.{group}").as_str())
        );
        assert_eq!(c.spec.group, group);
        assert_eq!(c.spec.scope, "Namespaced");
        let n = &c.spec.names;
        assert_eq!(n.plural, plural);
        assert_eq!(n.singular.as_deref(), Some(singular));
        assert_eq!(n.list_kind.as_deref(), Some(format!("{kind}List").as_str()));
        assert_eq!(
            n.short_names.as_deref(),
            Some([short.to_owned()].as_slice())
        );
        let category = group.replace('.', "-");
        assert_eq!(
            n.categories.as_deref(),
            Some(["istio-io".to_owned(), category].as_slice()),
            "{kind}"
        );
        let versions: Vec<(&str, bool, bool)> = c
            .spec
            .versions
            .iter()
            .map(|v| (v.name.as_str(), v.served, v.storage))
            .collect();
        let expected = if group == SECURITY_GROUP {
            &security[..]
        } else {
            &networking[..]
        };
        assert_eq!(versions, expected, "{kind}");
        for v in &c.spec.versions {
            assert!(
                v.subresources.as_ref().is_some_and(|s| s.status.is_some()),
                "{kind} {}: status subresource",
                v.name
            );
            let printed: Vec<(&str, &str)> = v
                .additional_printer_columns
                .iter()
                .flatten()
                .map(|c| (c.name.as_str(), c.json_path.as_str()))
                .collect();
            let mut want = columns.to_vec();
            want.push(("Age", ".metadata.creationTimestamp"));
            assert_eq!(printed, want, "{kind} {}: printer columns", v.name);
        }
    }
}

#[test]
fn authorization_policy_schema_covers_istios_fields() {
    let m = load();
    let spec = spec_schema(crd(&m, "AuthorizationPolicy"));
    assert_eq!(
        enum_values(at(&spec, "action")),
        ["ALLOW", "DENY", "AUDIT", "CUSTOM"]
    );
    let labels = at(&spec, "selector.matchLabels");
    assert!(matches!(
        labels.additional_properties.as_ref(),
        Some(JSONSchemaPropsOrBool::Schema(s)) if s.type_.as_deref() == Some("string")
    ));
    for f in [
        "principals",
        "notPrincipals",
        "namespaces",
        "notNamespaces",
        "ipBlocks",
        "notIpBlocks",
        "requestPrincipals",
        "notRequestPrincipals",
        "remoteIpBlocks",
        "notRemoteIpBlocks",
        "serviceAccounts",
        "notServiceAccounts",
    ] {
        assert!(
            string_list(at(&spec, &format!("rules[].from[].source.{f}"))),
            "source.{f}"
        );
    }
    for f in [
        "ports",
        "notPorts",
        "methods",
        "notMethods",
        "paths",
        "notPaths",
        "hosts",
        "notHosts",
    ] {
        assert!(
            string_list(at(&spec, &format!("rules[].to[].operation.{f}"))),
            "operation.{f}"
        );
    }
    assert_eq!(
        at(&spec, "rules[].when[].key").type_.as_deref(),
        Some("string")
    );
    assert_eq!(
        at(&spec, "rules[].when[]").required.as_deref(),
        Some(["key".to_owned()].as_slice())
    );
    for f in ["values", "notValues"] {
        assert!(
            string_list(at(&spec, &format!("rules[].when[].{f}"))),
            "when.{f}"
        );
    }
    for f in ["group", "kind", "name", "namespace"] {
        at(&spec, &format!("targetRef.{f}"));
        at(&spec, &format!("targetRefs[].{f}"));
    }
    at(&spec, "provider.name");
}

#[test]
fn peer_authentication_schema_covers_istios_fields() {
    let m = load();
    let spec = spec_schema(crd(&m, "PeerAuthentication"));
    let modes = ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"];
    assert_eq!(enum_values(at(&spec, "mtls.mode")), modes);
    at(&spec, "selector.matchLabels");
    let port_level = at(&spec, "portLevelMtls");
    let Some(JSONSchemaPropsOrBool::Schema(per_port)) = port_level.additional_properties.as_ref()
    else {
        panic!("portLevelMtls is a map of port to settings");
    };
    assert_eq!(enum_values(at(per_port, "mode")), modes);
}

/// The properties of an object schema, sorted.
fn fields(s: &JSONSchemaProps) -> Vec<&str> {
    props(s).keys().map(String::as_str).collect()
}

/// The schema of a map's values.
fn values_of(s: &JSONSchemaProps) -> &JSONSchemaProps {
    match s.additional_properties.as_ref() {
        Some(JSONSchemaPropsOrBool::Schema(v)) => v,
        _ => panic!("a map schema"),
    }
}

fn is_string_match(s: &JSONSchemaProps) -> bool {
    fields(s) == ["exact", "prefix", "regex"] && s.one_of.is_some()
}

/// A uint32 of Istio's API: an integer from 0 to 2^32 - 1.
fn is_uint32(s: &JSONSchemaProps) -> bool {
    s.type_.as_deref() == Some("integer")
        && s.minimum == Some(0.0)
        && s.maximum == Some(f64::from(u32::MAX))
}

/// A percentage (`{value: double}`).
fn is_percent(s: &JSONSchemaProps) -> bool {
    let value = at(s, "value");
    fields(s) == ["value"]
        && value.type_.as_deref() == Some("number")
        && value.format.as_deref() == Some("double")
}

/// A protobuf Duration: a string, with Istio's rule that it is at least 1ms.
fn is_duration(s: &JSONSchemaProps) -> bool {
    s.type_.as_deref() == Some("string")
        && s.x_kubernetes_validations
            .iter()
            .flatten()
            .any(|r| r.rule.contains("duration(self)"))
}

#[test]
fn virtual_service_schema_covers_istios_fields() {
    let m = load();
    let spec = spec_schema(crd(&m, "VirtualService"));
    assert_eq!(
        fields(&spec),
        ["exportTo", "gateways", "hosts", "http", "tcp", "tls"]
    );
    for f in ["hosts", "gateways", "exportTo"] {
        assert!(string_list(at(&spec, f)), "{f}");
    }
    let http = at(&spec, "http[]");
    assert_eq!(
        fields(http),
        [
            "corsPolicy",
            "delegate",
            "directResponse",
            "fault",
            "headers",
            "match",
            "mirror",
            "mirrorPercent",
            "mirrorPercentage",
            "mirror_percent",
            "mirrors",
            "name",
            "redirect",
            "retries",
            "rewrite",
            "route",
            "timeout",
        ]
    );
    assert_eq!(
        fields(at(http, "match[]")),
        [
            "authority",
            "gateways",
            "headers",
            "ignoreUriCase",
            "method",
            "name",
            "port",
            "queryParams",
            "scheme",
            "sourceLabels",
            "sourceNamespace",
            "statPrefix",
            "uri",
            "withoutHeaders",
        ]
    );
    for f in ["uri", "scheme", "method", "authority"] {
        assert!(is_string_match(at(http, &format!("match[].{f}"))), "{f}");
    }
    for f in ["headers", "withoutHeaders", "queryParams"] {
        assert!(
            is_string_match(values_of(at(http, &format!("match[].{f}")))),
            "{f}"
        );
    }
    assert!(is_string_match(at(http, "corsPolicy.allowOrigins[]")));
    assert!(is_uint32(at(http, "match[].port")));
    assert_eq!(
        at(http, "match[].ignoreUriCase").type_.as_deref(),
        Some("boolean")
    );
    for destination in ["route[].destination", "mirror", "mirrors[].destination"] {
        let d = at(http, destination);
        assert_eq!(fields(d), ["host", "port", "subset"], "{destination}");
        assert_eq!(d.required.as_deref(), Some(["host".to_owned()].as_slice()));
        assert!(is_uint32(at(d, "port.number")), "{destination}");
    }
    assert_eq!(at(http, "route[].weight").type_.as_deref(), Some("integer"));
    for side in ["request", "response"] {
        let ops = at(http, &format!("route[].headers.{side}"));
        assert_eq!(fields(ops), ["add", "remove", "set"]);
        assert_eq!(values_of(at(ops, "set")).type_.as_deref(), Some("string"));
        assert!(string_list(at(ops, "remove")));
        assert_eq!(fields(at(http, &format!("headers.{side}"))), fields(ops));
    }
    assert_eq!(
        fields(at(http, "redirect")),
        [
            "authority",
            "derivePort",
            "port",
            "redirectCode",
            "scheme",
            "uri"
        ]
    );
    assert_eq!(
        enum_values(at(http, "redirect.derivePort")),
        ["FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"]
    );
    assert_eq!(fields(at(http, "directResponse.body")), ["bytes", "string"]);
    assert_eq!(fields(at(http, "delegate")), ["name", "namespace"]);
    assert_eq!(
        fields(at(http, "rewrite")),
        ["authority", "uri", "uriRegexRewrite"]
    );
    assert_eq!(
        fields(at(http, "rewrite.uriRegexRewrite")),
        ["match", "rewrite"]
    );
    assert_eq!(
        fields(at(http, "retries")),
        [
            "attempts",
            "backoff",
            "perTryTimeout",
            "retryIgnorePreviousHosts",
            "retryOn",
            "retryRemoteLocalities",
        ]
    );
    for d in [
        "timeout",
        "retries.perTryTimeout",
        "retries.backoff",
        "fault.delay.fixedDelay",
        "corsPolicy.maxAge",
    ] {
        assert!(is_duration(at(http, d)), "{d}");
    }
    for p in [
        "fault.delay.percentage",
        "fault.abort.percentage",
        "mirrorPercentage",
        "mirrors[].percentage",
    ] {
        assert!(is_percent(at(http, p)), "{p}");
    }
    assert_eq!(
        fields(at(http, "fault.abort")),
        ["grpcStatus", "http2Error", "httpStatus", "percentage"]
    );
    assert_eq!(
        fields(at(http, "corsPolicy")),
        [
            "allowCredentials",
            "allowHeaders",
            "allowMethods",
            "allowOrigin",
            "allowOrigins",
            "exposeHeaders",
            "maxAge",
            "unmatchedPreflights",
        ]
    );
    assert_eq!(
        enum_values(at(http, "corsPolicy.unmatchedPreflights")),
        ["UNSPECIFIED", "FORWARD", "IGNORE"]
    );
    assert_eq!(
        fields(at(&spec, "tls[].match[]")),
        [
            "destinationSubnets",
            "gateways",
            "port",
            "sniHosts",
            "sourceLabels",
            "sourceNamespace",
        ]
    );
    assert_eq!(
        fields(at(&spec, "tcp[].match[]")),
        [
            "destinationSubnets",
            "gateways",
            "port",
            "sourceLabels",
            "sourceNamespace",
            "sourceSubnet",
        ]
    );
    for l4 in ["tls", "tcp"] {
        assert_eq!(
            fields(at(&spec, &format!("{l4}[].route[]"))),
            ["destination", "weight"]
        );
        assert!(is_uint32(at(&spec, &format!("{l4}[].match[].port"))));
    }
}

#[test]
fn destination_rule_schema_covers_istios_fields_in_every_traffic_policy() {
    let m = load();
    let spec = spec_schema(crd(&m, "DestinationRule"));
    assert_eq!(
        fields(&spec),
        [
            "exportTo",
            "host",
            "subsets",
            "trafficPolicy",
            "workloadSelector"
        ]
    );
    assert_eq!(
        spec.required.as_deref(),
        Some(["host".to_owned()].as_slice())
    );
    assert_eq!(
        fields(at(&spec, "subsets[]")),
        ["labels", "name", "trafficPolicy"]
    );
    at(&spec, "workloadSelector.matchLabels");
    // The trafficPolicy of the rule and of a subset are the same, expanded in place.
    let policy = at(&spec, "trafficPolicy");
    let undescribed = |s: &JSONSchemaProps| JSONSchemaProps {
        description: None,
        ..s.clone()
    };
    assert_eq!(
        undescribed(policy),
        undescribed(at(&spec, "subsets[].trafficPolicy"))
    );
    assert_eq!(
        fields(policy),
        [
            "connectionPool",
            "loadBalancer",
            "outlierDetection",
            "portLevelSettings",
            "proxyProtocol",
            "retryBudget",
            "tls",
            "tunnel",
        ]
    );
    let port_level = at(policy, "portLevelSettings[]");
    assert_eq!(
        fields(port_level),
        [
            "connectionPool",
            "loadBalancer",
            "outlierDetection",
            "port",
            "tls"
        ]
    );
    assert!(is_uint32(at(port_level, "port.number")));
    for (p, s) in [("", policy), ("portLevelSettings[].", port_level)] {
        let lb = at(s, "loadBalancer");
        assert_eq!(
            fields(lb),
            [
                "consistentHash",
                "localityLbSetting",
                "simple",
                "warmup",
                "warmupDurationSecs",
            ],
            "{p}loadBalancer"
        );
        assert_eq!(
            enum_values(at(lb, "simple")),
            [
                "UNSPECIFIED",
                "LEAST_CONN",
                "RANDOM",
                "PASSTHROUGH",
                "ROUND_ROBIN",
                "LEAST_REQUEST",
            ]
        );
        assert_eq!(
            fields(at(lb, "consistentHash")),
            [
                "httpCookie",
                "httpHeaderName",
                "httpQueryParameterName",
                "maglev",
                "minimumRingSize",
                "ringHash",
                "useSourceIp",
            ]
        );
        assert_eq!(
            fields(at(lb, "consistentHash.httpCookie")),
            ["attributes", "name", "path", "ttl"]
        );
        at(lb, "consistentHash.ringHash.minimumRingSize");
        at(lb, "consistentHash.maglev.tableSize");
        assert_eq!(
            fields(at(lb, "localityLbSetting")),
            ["distribute", "enabled", "failover", "failoverPriority"]
        );
        assert!(is_uint32(values_of(at(
            lb,
            "localityLbSetting.distribute[].to"
        ))));
        assert!(is_duration(at(lb, "warmupDurationSecs")));
        assert!(is_duration(at(lb, "warmup.duration")));

        let tcp = at(s, "connectionPool.tcp");
        assert_eq!(
            fields(tcp),
            [
                "connectTimeout",
                "idleTimeout",
                "maxConnectionDuration",
                "maxConnections",
                "tcpKeepalive",
            ]
        );
        assert_eq!(
            fields(at(tcp, "tcpKeepalive")),
            ["interval", "probes", "time"]
        );
        assert!(is_duration(at(tcp, "connectTimeout")));
        let http = at(s, "connectionPool.http");
        assert_eq!(
            fields(http),
            [
                "h2UpgradePolicy",
                "http1MaxPendingRequests",
                "http2MaxRequests",
                "idleTimeout",
                "maxConcurrentStreams",
                "maxRequestsPerConnection",
                "maxRetries",
                "useClientProtocol",
            ]
        );
        assert_eq!(
            enum_values(at(http, "h2UpgradePolicy")),
            ["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"]
        );
        let outlier = at(s, "outlierDetection");
        assert_eq!(
            fields(outlier),
            [
                "baseEjectionTime",
                "consecutive5xxErrors",
                "consecutiveErrors",
                "consecutiveGatewayErrors",
                "consecutiveLocalOriginFailures",
                "interval",
                "maxEjectionPercent",
                "minHealthPercent",
                "splitExternalLocalOriginErrors",
            ]
        );
        assert!(is_uint32(at(outlier, "consecutive5xxErrors")));
        assert!(is_duration(at(outlier, "interval")));
        assert!(is_duration(at(outlier, "baseEjectionTime")));
        let tls = at(s, "tls");
        assert_eq!(
            fields(tls),
            [
                "caCertificates",
                "caCrl",
                "clientCertificate",
                "credentialName",
                "insecureSkipVerify",
                "mode",
                "privateKey",
                "sni",
                "subjectAltNames",
            ]
        );
        assert_eq!(
            enum_values(at(tls, "mode")),
            ["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]
        );
    }
    assert_eq!(
        fields(at(policy, "tunnel")),
        ["protocol", "targetHost", "targetPort"]
    );
    assert_eq!(
        enum_values(at(policy, "proxyProtocol.version")),
        ["V1", "V2"]
    );
    assert_eq!(
        fields(at(policy, "retryBudget")),
        ["minRetryConcurrency", "percent"]
    );
}

/// Paths where unknown fields are kept (`x-kubernetes-preserve-unknown-fields`).
fn open_paths(s: &JSONSchemaProps, path: &str, out: &mut Vec<String>) {
    if s.x_kubernetes_preserve_unknown_fields == Some(true) {
        out.push(path.to_owned());
    }
    for (name, p) in s.properties.iter().flatten() {
        let sub = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}.{name}")
        };
        open_paths(p, &sub, out);
    }
    if let Some(JSONSchemaPropsOrArray::Schema(i)) = &s.items {
        open_paths(i, &format!("{path}[]"), out);
    }
    if let Some(JSONSchemaPropsOrBool::Schema(a)) = &s.additional_properties {
        open_paths(a, &format!("{path}{{}}"), out);
    }
}

#[test]
fn crd_schemas_are_closed_except_status_as_in_istio() {
    let m = load();
    for c in &m.crds {
        for v in &c.spec.versions {
            let root = v
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .unwrap();
            let mut open = Vec::new();
            open_paths(root, "", &mut open);
            assert_eq!(open, ["status"], "{} {}", c.spec.names.kind, v.name);
        }
    }
}

/// A structural check of `value` against `schema` (types, enums, known fields, required,
/// `null` where nullable, and the `oneOf`/`anyOf`/`allOf`/`not` that Istio's CRDs use for
/// protobuf oneofs): what the API server does before CEL rules, which are not evaluated
/// here.
fn validate(schema: &JSONSchemaProps, value: &Value, path: &str) -> Result<(), String> {
    if value.is_null() && schema.nullable == Some(true) {
        return Ok(());
    }
    if let Some(allowed) = &schema.enum_
        && !allowed.iter().any(|a| a.0 == *value)
    {
        return Err(format!("{path}: {value} is not one of the allowed values"));
    }
    let holds = |s: &JSONSchemaProps| validate(s, value, path).is_ok();
    if let Some(branches) = &schema.one_of {
        let n = branches.iter().filter(|b| holds(b)).count();
        if n != 1 {
            return Err(format!(
                "{path}: {n} of its oneOf alternatives hold, not one (fields that exclude each other?)"
            ));
        }
    }
    if let Some(branches) = &schema.any_of
        && !branches.iter().any(holds)
    {
        return Err(format!("{path}: none of its anyOf alternatives holds"));
    }
    for branch in schema.all_of.iter().flatten() {
        validate(branch, value, path)?;
    }
    if let Some(not) = &schema.not
        && holds(not)
    {
        return Err(format!("{path}: matches what it must not"));
    }
    let ty = schema.type_.as_deref().unwrap_or_default();
    if let Value::Object(map) = value
        && matches!(ty, "object" | "")
    {
        for req in schema.required.iter().flatten() {
            if !map.contains_key(req) {
                return Err(format!("{path}.{req}: required"));
            }
        }
    }
    match (ty, value) {
        // A constraint without a type (inside oneOf and the like): checked above.
        ("", _) => Ok(()),
        ("object", Value::Object(map)) => {
            for (k, v) in map {
                let sub = format!("{path}.{k}");
                match (
                    schema.properties.as_ref().and_then(|p| p.get(k)),
                    &schema.additional_properties,
                ) {
                    (Some(s), _) => validate(s, v, &sub)?,
                    (None, Some(JSONSchemaPropsOrBool::Schema(s))) => validate(s, v, &sub)?,
                    _ if schema.x_kubernetes_preserve_unknown_fields == Some(true) => {}
                    _ => return Err(format!("{sub}: unknown field")),
                }
            }
            Ok(())
        }
        ("array", Value::Array(values)) => values
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| validate(items(schema), v, &format!("{path}[{i}]"))),
        ("string", Value::String(_)) | ("boolean", Value::Bool(_)) => Ok(()),
        ("integer", Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(()),
        ("number", Value::Number(_)) => Ok(()),
        _ => Err(format!("{path}: {value} is not of type {ty:?}")),
    }
}

fn validate_spec(m: &Manifests, kind: &str, spec: &Value) -> Result<(), String> {
    validate(&spec_schema(crd(m, kind)), spec, "spec")
}

#[test]
fn istio_documentation_examples_fit_the_crd_schemas() {
    let m = load();
    let policies = [
        // allow-nothing
        json!({}),
        json!({
            "selector": {"matchLabels": {"app": "httpbin", "version": "v1"}},
            "action": "ALLOW",
            "rules": [{
                "from": [
                    {"source": {"principals": ["cluster.local/ns/default/sa/sleep"]}},
                    {"source": {"namespaces": ["dev"]}},
                ],
                "to": [{"operation": {"methods": ["GET"], "paths": ["/info*"]}}],
                "when": [{"key": "request.auth.claims[iss]", "values": ["https://accounts.google.com"]}],
            }],
        }),
        json!({
            "action": "DENY",
            "rules": [{
                "from": [{"source": {"notNamespaces": ["foo"], "ipBlocks": ["10.0.0.0/8"], "notIpBlocks": ["10.1.0.0/16"]}}],
                "to": [{"operation": {"ports": ["8080"], "notPorts": ["9090"], "hosts": ["a.example"], "notMethods": ["DELETE"]}}],
                "when": [{"key": "destination.port", "notValues": ["22"]}],
            }],
        }),
        json!({
            "targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"serviceAccounts": ["ns1/sa1"], "requestPrincipals": ["*"], "remoteIpBlocks": ["1.2.3.4"]}}]}],
        }),
        json!({"action": "CUSTOM", "provider": {"name": "my-ext-authz"}, "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}),
        json!({"action": "AUDIT", "targetRef": {"kind": "Service", "group": "", "name": "web"}, "rules": [{}]}),
    ];
    for p in &policies {
        validate_spec(&m, "AuthorizationPolicy", p).unwrap_or_else(|e| panic!("{p}: {e}"));
    }
    let peer = [
        json!({"mtls": {"mode": "STRICT"}}),
        json!({
            "selector": {"matchLabels": {"app": "finance"}},
            "mtls": {"mode": "PERMISSIVE"},
            "portLevelMtls": {"8080": {"mode": "DISABLE"}, "9090": {"mode": "UNSET"}},
        }),
    ];
    for p in &peer {
        validate_spec(&m, "PeerAuthentication", p).unwrap_or_else(|e| panic!("{p}: {e}"));
    }

    // And what Istio rejects, this rejects.
    for (kind, bad) in [
        ("AuthorizationPolicy", json!({"action": "PERMIT"})),
        ("AuthorizationPolicy", json!({"rule": [{}]})),
        (
            "AuthorizationPolicy",
            json!({"rules": [{"to": [{"operation": {"ports": [8080]}}]}]}),
        ),
        (
            "AuthorizationPolicy",
            json!({"rules": [{"when": [{"values": ["x"]}]}]}),
        ),
        ("AuthorizationPolicy", json!({"targetRef": {"name": "web"}})),
        ("PeerAuthentication", json!({"mtls": {"mode": "ON"}})),
        (
            "PeerAuthentication",
            json!({"portLevelMtls": {"8080": {"mode": "MUTUAL"}}}),
        ),
    ] {
        assert!(
            validate_spec(&m, kind, &bad).is_err(),
            "{kind} {bad} should be rejected"
        );
    }
}

/// Every document of a multi-document YAML text, as JSON.
fn yaml_objects(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|de| {
            let yaml =
                <serde_yaml_ng::Value as serde::Deserialize>::deserialize(de).expect("valid YAML");
            serde_json::to_value(yaml).expect("JSON")
        })
        .collect()
}

/// Checks an object as the API server would: a served version of its kind's group, and a
/// spec that fits the schema.
fn validate_object(m: &Manifests, object: &Value) -> Result<(), String> {
    let kind = object["kind"].as_str().ok_or("no kind")?;
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let c = crd(m, kind);
    let (group, version) = object["apiVersion"]
        .as_str()
        .and_then(|v| v.split_once('/'))
        .ok_or_else(|| format!("{kind} {name}: no group/version"))?;
    if group != c.spec.group
        || !c
            .spec
            .versions
            .iter()
            .any(|v| v.name == version && v.served)
    {
        return Err(format!("{kind} {name}: {group}/{version} is not served"));
    }
    validate(&spec_schema(c), &object["spec"], "spec").map_err(|e| format!("{kind} {name}: {e}"))
}

/// Istio's Bookinfo sample (samples/bookinfo/networking/destination-rule-all.yaml).
const BOOKINFO_DESTINATION_RULES: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: productpage
spec:
  host: productpage
  subsets:
  - name: v1
    labels:
      version: v1
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
  - name: v3
    labels:
      version: v3
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: ratings
spec:
  host: ratings
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
  - name: v2-mysql
    labels:
      version: v2-mysql
  - name: v2-mysql-vm
    labels:
      version: v2-mysql-vm
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: details
spec:
  host: details
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
"#;

/// Bookinfo's request-routing and fault-injection VirtualServices, and those of Istio's
/// retries, timeouts and mirroring tasks.
const TASK_VIRTUAL_SERVICES: &str = r#"
# virtual-service-reviews-test-v2.yaml
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination:
        host: reviews
        subset: v2
  - route:
    - destination:
        host: reviews
        subset: v1
---
# virtual-service-ratings-test-delay.yaml
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      delay:
        percentage:
          value: 100.0
        fixedDelay: 7s
    route:
    - destination:
        host: ratings
        subset: v1
  - route:
    - destination:
        host: ratings
        subset: v1
---
# virtual-service-ratings-test-abort.yaml
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      abort:
        percentage:
          value: 100.0
        httpStatus: 500
    route:
    - destination:
        host: ratings
        subset: v1
  - route:
    - destination:
        host: ratings
        subset: v1
---
# Retries and a request timeout.
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - route:
    - destination:
        host: ratings
        subset: v1
    retries:
      attempts: 3
      perTryTimeout: 2s
      retryOn: gateway-error,connect-failure
    timeout: 10s
---
# Mirroring: all traffic to v1, a copy of it to v2.
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: httpbin
spec:
  hosts:
  - httpbin
  http:
  - route:
    - destination:
        host: httpbin
        subset: v1
      weight: 100
    mirror:
      host: httpbin
      subset: v2
    mirrorPercentage:
      value: 100
"#;

/// The circuit-breaking task's DestinationRule.
const CIRCUIT_BREAKER: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: httpbin
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
        maxRequestsPerConnection: 1
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
"#;

#[test]
fn istio_networking_examples_fit_the_crd_schemas() {
    let m = load();
    let bookinfo = yaml_objects(BOOKINFO_DESTINATION_RULES);
    let subsets: Vec<(&str, usize)> = bookinfo
        .iter()
        .map(|d| {
            (
                d["spec"]["host"].as_str().unwrap(),
                d["spec"]["subsets"].as_array().unwrap().len(),
            )
        })
        .collect();
    assert_eq!(
        subsets,
        [
            ("productpage", 1),
            ("reviews", 3),
            ("ratings", 4),
            ("details", 2)
        ]
    );
    let mut objects = bookinfo;
    objects.extend(yaml_objects(TASK_VIRTUAL_SERVICES));
    objects.extend(yaml_objects(CIRCUIT_BREAKER));
    // Further fields of Istio's reference pages, at every level a schema is expanded.
    objects.push(json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "edge"},
        "spec": {
            "hosts": ["shop.example.com", "*.internal.example.com"],
            "gateways": ["istio-system/edge", "mesh"],
            "exportTo": ["."],
            "http": [
                {
                    "name": "api",
                    "match": [{
                        "name": "v2-api",
                        "uri": {"prefix": "/api/v2/"},
                        "method": {"regex": "GET|HEAD"},
                        "scheme": {"exact": "https"},
                        "authority": {"exact": "shop.example.com"},
                        "queryParams": {"debug": {"exact": "1"}},
                        "withoutHeaders": {"x-canary": {}},
                        "port": 443,
                        "sourceLabels": {"app": "web"},
                        "sourceNamespace": "frontend",
                        "gateways": ["istio-system/edge"],
                        "ignoreUriCase": true,
                        "statPrefix": "api",
                    }],
                    "rewrite": {"uriRegexRewrite": {"match": "^/api/v2/(.*)", "rewrite": "/\\1"}, "authority": "api.internal"},
                    "route": [
                        {"destination": {"host": "api", "subset": "stable", "port": {"number": 8080}}, "weight": 90,
                         "headers": {"request": {"set": {"x-route": "stable"}}, "response": {"remove": ["server"]}}},
                        {"destination": {"host": "api", "subset": "canary", "port": {"number": 8080}}, "weight": 10},
                    ],
                    "headers": {"request": {"add": {"x-via": "edge"}}},
                    "corsPolicy": {
                        "allowOrigins": [{"exact": "https://shop.example.com"}, {"regex": "https://.*\\.example\\.com"}],
                        "allowMethods": ["GET", "POST"],
                        "allowHeaders": ["authorization"],
                        "exposeHeaders": ["x-request-id"],
                        "maxAge": "24h",
                        "allowCredentials": true,
                        "unmatchedPreflights": "IGNORE",
                    },
                    "mirrors": [{"destination": {"host": "api-shadow"}, "percentage": {"value": 12.5}}],
                    "retries": {"attempts": 2, "retryOn": "5xx", "retryRemoteLocalities": null, "retryIgnorePreviousHosts": true, "backoff": "25ms"},
                    "fault": {"abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 0.1}}},
                },
                {"match": [{"uri": {"exact": "/old"}}], "redirect": {"uri": "/new", "authority": "shop.example.com", "derivePort": "FROM_REQUEST_PORT", "scheme": "https", "redirectCode": 308}},
                {"match": [{"uri": {"exact": "/healthz"}}], "directResponse": {"status": 200, "body": {"string": "ok"}}},
                {"match": [{"uri": {"prefix": "/legacy"}}], "delegate": {"name": "legacy-routes", "namespace": "legacy"}},
                {"route": [{"destination": {"host": "web"}}], "mirror": {"host": "web-shadow"}, "mirrorPercent": 5},
            ],
            "tls": [{
                "match": [{"sniHosts": ["shop.example.com"], "port": 443, "destinationSubnets": ["10.0.0.0/8"], "sourceLabels": {"app": "web"}, "gateways": ["mesh"], "sourceNamespace": "frontend"}],
                "route": [{"destination": {"host": "shop-tls", "port": {"number": 443}}, "weight": 100}],
            }],
            "tcp": [{
                "match": [{"port": 5432, "destinationSubnets": ["10.1.0.0/16"], "sourceLabels": {"app": "api"}, "sourceNamespace": "backend"}],
                "route": [{"destination": {"host": "postgres", "port": {"number": 5432}}}],
            }],
        },
    }));
    objects.push(json!({
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "DestinationRule",
        "metadata": {"name": "api"},
        "spec": {
            "host": "api.backend.svc.cluster.local",
            "exportTo": ["*"],
            "workloadSelector": {"matchLabels": {"app": "web"}},
            "trafficPolicy": {
                "loadBalancer": {
                    "consistentHash": {
                        "httpCookie": {"name": "session", "path": "/", "ttl": "0s", "attributes": [{"name": "SameSite", "value": "Strict"}]},
                        "ringHash": {"minimumRingSize": 1024},
                    },
                    "localityLbSetting": {
                        "enabled": true,
                        "distribute": [{"from": "us-west/zone1/*", "to": {"us-west/zone1/*": 80, "us-west/zone2/*": 20}}],
                        "failoverPriority": ["topology.kubernetes.io/region"],
                    },
                    "warmup": {"duration": "60s", "minimumPercent": 10, "aggression": 1.5},
                },
                "connectionPool": {
                    "tcp": {"maxConnections": 100, "connectTimeout": "30ms", "tcpKeepalive": {"probes": 3, "time": "7200s", "interval": "75s"}, "maxConnectionDuration": "1h", "idleTimeout": "1h"},
                    "http": {"http2MaxRequests": 1000, "maxRetries": 3, "idleTimeout": "30s", "h2UpgradePolicy": "UPGRADE", "useClientProtocol": false, "maxConcurrentStreams": 100},
                },
                "outlierDetection": {"consecutiveGatewayErrors": 5, "consecutiveLocalOriginFailures": 3, "splitExternalLocalOriginErrors": true, "minHealthPercent": 50, "consecutiveErrors": 7},
                "tls": {"mode": "ISTIO_MUTUAL", "sni": "api.backend.svc.cluster.local"},
                "portLevelSettings": [{
                    "port": {"number": 9443},
                    "loadBalancer": {"simple": "LEAST_REQUEST", "warmupDurationSecs": "30s"},
                    "connectionPool": {"tcp": {"maxConnections": 10}},
                    "outlierDetection": {"consecutive5xxErrors": null},
                    "tls": {"mode": "MUTUAL", "clientCertificate": "/etc/certs/client.pem", "privateKey": "/etc/certs/key.pem", "caCertificates": "/etc/certs/ca.pem", "subjectAltNames": ["api.example.com"], "caCrl": "/etc/certs/crl.pem"},
                }],
                "tunnel": {"protocol": "CONNECT", "targetHost": "api.internal", "targetPort": 8443},
                "proxyProtocol": {"version": "V2"},
                "retryBudget": {"percent": 20.0, "minRetryConcurrency": 3},
            },
            "subsets": [{
                "name": "canary",
                "labels": {"track": "canary"},
                "trafficPolicy": {
                    "loadBalancer": {"consistentHash": {"useSourceIp": true, "maglev": {"tableSize": 65537}}},
                    "tls": {"mode": "SIMPLE", "credentialName": "api-client", "insecureSkipVerify": false},
                    "portLevelSettings": [{"port": {"number": 8080}, "loadBalancer": {"simple": "ROUND_ROBIN"}}],
                },
            }],
        },
    }));
    for object in &objects {
        validate_object(&m, object).unwrap_or_else(|e| panic!("{e}\n{object}"));
    }

    // A misspelt or misplaced field, a wrong type, a value outside an enum, fields that
    // exclude each other and a missing required field are refused, each for that reason.
    let vs = |spec: Value| json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "bad"}, "spec": spec});
    let dr = |spec: Value| json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "bad"}, "spec": spec});
    let route = json!([{"destination": {"host": "reviews"}}]);
    for (bad, error) in [
        (
            vs(json!({"hosts": ["reviews"], "http": [{"rout": route}]})),
            "spec.http[0].rout: unknown field",
        ),
        (
            vs(
                json!({"http": [{"route": [{"destination": {"host": "reviews", "subset": "v1", "port": 9080}}]}]}),
            ),
            "destination.port: 9080 is not of type \"object\"",
        ),
        (
            vs(
                json!({"http": [{"route": [{"destination": {"host": "reviews"}, "weight": "50"}]}]}),
            ),
            "weight: \"50\" is not of type \"integer\"",
        ),
        (
            vs(json!({"http": [{"route": [{"destination": {"subset": "v1"}}]}]})),
            "destination.host: required",
        ),
        (
            vs(
                json!({"http": [{"match": [{"uri": {"exact": "/a", "prefix": "/"}}], "route": route}]}),
            ),
            "match[0].uri: 2 of its oneOf",
        ),
        (
            vs(
                json!({"http": [{"match": [{"headers": {"end-user": {"exactly": "jason"}}}], "route": route}]}),
            ),
            "end-user.exactly: unknown field",
        ),
        (
            vs(json!({"http": [{"redirect": {"port": 8443, "derivePort": "FROM_REQUEST_PORT"}}]})),
            "redirect: 2 of its oneOf",
        ),
        (
            vs(json!({"http": [{"redirect": {"derivePort": "FROM_CLIENT"}}]})),
            "derivePort: \"FROM_CLIENT\" is not one of",
        ),
        (
            vs(
                json!({"http": [{"fault": {"delay": {"fixedDelay": "7s", "percentage": {"value": "100"}}}, "route": route}]}),
            ),
            "percentage.value: \"100\" is not of type \"number\"",
        ),
        (
            vs(
                json!({"http": [{"fault": {"abort": {"httpStatus": 500, "grpcStatus": "UNAVAILABLE"}}, "route": route}]}),
            ),
            "abort: 2 of its oneOf",
        ),
        (
            vs(json!({"http": [{"directResponse": {"body": {"string": "ok"}}}]})),
            "directResponse.status: required",
        ),
        (
            vs(json!({"http": [{"retries": {"attempts": 3, "perTryTimeout": 2}, "route": route}]})),
            "perTryTimeout: 2 is not of type \"string\"",
        ),
        (
            vs(json!({"tls": [{"route": route}]})),
            "spec.tls[0].match: required",
        ),
        (
            vs(json!({"tcp": [{"match": [{"sniHosts": ["a"]}], "route": route}]})),
            "tcp[0].match[0].sniHosts: unknown field",
        ),
        (
            dr(
                json!({"host": "reviews", "trafficPolicy": {"conectionPool": {"tcp": {"maxConnections": 1}}}}),
            ),
            "spec.trafficPolicy.conectionPool: unknown field",
        ),
        (
            dr(json!({"subsets": [{"name": "v1", "labels": {"version": "v1"}}]})),
            "spec.host: required",
        ),
        (
            dr(json!({"host": "reviews", "subsets": [{"labels": {"version": "v1"}}]})),
            "subsets[0].name: required",
        ),
        (
            dr(
                json!({"host": "reviews", "subsets": [{"name": "v1", "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBBIN"}}}]}),
            ),
            "subsets[0].trafficPolicy.loadBalancer.simple: \"ROUND_ROBBIN\"",
        ),
        (
            dr(
                json!({"host": "reviews", "trafficPolicy": {"loadBalancer": {"simple": "RANDOM", "consistentHash": {"useSourceIp": true}}}}),
            ),
            "loadBalancer: 2 of its oneOf",
        ),
        (
            dr(
                json!({"host": "reviews", "trafficPolicy": {"portLevelSettings": [{"port": {"number": 80}, "tls": {"mode": "ISTIO_MTLS"}}]}}),
            ),
            "portLevelSettings[0].tls.mode: \"ISTIO_MTLS\"",
        ),
        (
            dr(
                json!({"host": "reviews", "trafficPolicy": {"outlierDetection": {"consecutive5xxErrors": "1"}}}),
            ),
            "consecutive5xxErrors: \"1\" is not of type",
        ),
        (
            dr(
                json!({"host": "reviews", "trafficPolicy": {"connectionPool": {"http": {"h2UpgradePolicy": "ALWAYS"}}}}),
            ),
            "h2UpgradePolicy: \"ALWAYS\" is not one of",
        ),
        (
            dr(json!({"host": "reviews", "trafficPolicy": {"tunnel": {"protocol": "CONNECT"}}})),
            "tunnel.targetHost: required",
        ),
        (
            dr(
                json!({"host": "reviews", "trafficPolicy": {"portLevelSettings": [{"tunnel": {"targetHost": "a", "targetPort": 1}}]}}),
            ),
            "portLevelSettings[0].tunnel: unknown field",
        ),
    ] {
        match validate_object(&m, &bad) {
            Ok(()) => panic!("should be refused ({error}): {bad}"),
            Err(e) => assert!(e.contains(error), "refused for another reason: {e}"),
        }
    }
    // And Istio's kinds are refused under another group or an unserved version.
    for api_version in ["security.istio.io/v1", "networking.istio.io/v2"] {
        let mut obj = vs(json!({"hosts": ["reviews"]}));
        obj["apiVersion"] = json!(api_version);
        assert!(validate_object(&m, &obj).is_err(), "{api_version}");
    }
}

/// `kubectl kustomize deploy/DIR`, parsed. kubectl's built-in kustomize is Go's YAML
/// parser (it reads e.g. `0400` as octal), the reference for what these files mean.
/// `cargo xtask setup` installs kubectl (Debian's `kubernetes-client`) when it is missing;
/// under CI=true a missing kubectl fails the test, elsewhere it is skipped.
fn kustomize(dir: &str) -> Option<Vec<Value>> {
    let out = match Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy_dir().join(dir))
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            assert!(
                std::env::var("CI").is_err(),
                "kubectl kustomize cannot run ({e}): cargo xtask setup installs it"
            );
            eprintln!("SKIPPED: kubectl kustomize cannot run ({e}); kustomize build not checked");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/{dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 output");
    let built = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|de| {
            let y = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(de)
                .expect("kustomize output");
            serde_json::to_value(y).expect("JSON")
        })
        .collect();
    Some(built)
}

/// An object's identity in a build: kind, namespace, name.
fn object_key(v: &Value) -> String {
    format!(
        "{} {}/{}",
        v["kind"].as_str().unwrap_or_default(),
        v["metadata"]["namespace"].as_str().unwrap_or_default(),
        v["metadata"]["name"].as_str().unwrap_or_default()
    )
}

/// `mesh-agent manifest generate --profile P` gives exactly the objects `kubectl kustomize`
/// builds of P's directory; the waypoint's and gateway's kustomizations build too.
#[test]
fn every_profile_generates_what_kustomize_builds() {
    use mesh_agent::manifest::{self, Profile};
    for profile in [Profile::Minimal, Profile::Default, Profile::Demo] {
        let Some(built) = kustomize(profile.dir()) else {
            return;
        };
        let generated = manifest::generate(profile).expect("manifest generate");
        let by_key = |list: &[Value]| -> BTreeMap<String, Value> {
            list.iter().map(|v| (object_key(v), v.clone())).collect()
        };
        let (built, generated) = (by_key(&built), by_key(&generated));
        assert_eq!(
            built.keys().collect::<Vec<_>>(),
            generated.keys().collect::<Vec<_>>(),
            "{profile:?}: the same objects"
        );
        for (key, b) in &built {
            if let Some(path) = first_difference(b, &generated[key], "") {
                panic!("{profile:?}: {key} differs at `{path}`");
            }
        }
    }
    for dir in [WAYPOINT_DIR, GATEWAY_DIR] {
        let built = kustomize(dir).expect("kubectl ran for the profiles");
        assert!(!built.is_empty(), "deploy/{dir}");
    }
}

/// Every YAML file under deploy/ is embedded in the binary (`manifest generate` reads
/// those, not the disk).
#[test]
fn manifest_generate_embeds_every_file_of_deploy() {
    let root = deploy_dir();
    let mut files = Vec::new();
    yaml_files(&root, &mut files);
    let on_disk: BTreeSet<String> = files
        .iter()
        .map(|p| p.strip_prefix(&root).unwrap().display().to_string())
        .collect();
    let embedded: BTreeSet<String> = mesh_agent::manifest::FILES
        .iter()
        .map(|(p, _)| p.to_string())
        .collect();
    assert_eq!(on_disk, embedded, "mesh-agent/src/manifest.rs FILES");
}

/// What kustomize makes of deploy/agent equals what this test read (serde_yaml_ng, YAML
/// 1.2), but for the image the kustomization sets.
#[test]
fn kustomize_build_agrees_with_the_files() {
    let Some(built) = kustomize("agent") else {
        return;
    };
    let m = load();
    let (_, k) = one(&m.kustomizations, "kustomization");
    let image = &k["images"][0];
    let (from, to) = (
        image["name"].as_str().unwrap(),
        format!(
            "{}:{}",
            image["newName"].as_str().unwrap(),
            image["newTag"].as_str().unwrap()
        ),
    );
    let key = |v: &Value| {
        format!(
            "{}/{}",
            v["kind"].as_str().unwrap_or_default(),
            v["metadata"]["name"].as_str().unwrap_or_default()
        )
    };
    let mut sources: BTreeMap<String, Value> = documents()
        .into_iter()
        .filter(|d| d.value["kind"] != "Kustomization")
        .map(|d| (key(&d.value), d.value))
        .collect();
    assert_eq!(
        built.iter().map(key).collect::<BTreeSet<_>>(),
        sources.keys().cloned().collect::<BTreeSet<_>>(),
        "kustomize builds exactly the manifests"
    );
    for b in &built {
        let mut expected = sources.remove(&key(b)).unwrap();
        if let Some(pod) = expected.pointer_mut("/spec/template/spec") {
            for list in ["containers", "initContainers"] {
                for c in pod[list].as_array_mut().into_iter().flatten() {
                    if c["image"] == from {
                        c["image"] = Value::String(to.clone());
                    }
                }
            }
        }
        if let Some(path) = first_difference(&expected, b, "") {
            panic!(
                "{}: kustomize reads `{path}` differently: {} vs {}",
                key(b),
                expected
                    .pointer(&format!("/{}", path.replace('.', "/")))
                    .unwrap_or(&Value::Null),
                b
            );
        }
    }
}

// ---- the waypoint (deploy/waypoint/, its own kustomization) ----

/// Every document under deploy/waypoint/.
fn waypoint_documents() -> Vec<Doc> {
    documents_under(&deploy_dir().join(WAYPOINT_DIR))
}

#[test]
fn the_waypoint_manifests_agree_with_the_binary_the_gateway_and_each_other() {
    let mut deployment: Option<Deployment> = None;
    let mut service: Option<K8sService> = None;
    let mut account: Option<ServiceAccount> = None;
    let mut gateway: Option<Value> = None;
    let mut kustomization: Option<Value> = None;
    for doc in waypoint_documents() {
        let api_version = doc.value["apiVersion"].as_str().unwrap_or_default();
        let kind = doc.value["kind"].as_str().unwrap_or_default();
        match (api_version, kind) {
            ("apps/v1", "Deployment") => deployment = Some(typed(&doc)),
            ("v1", "Service") => service = Some(typed(&doc)),
            ("v1", "ServiceAccount") => account = Some(typed(&doc)),
            ("gateway.networking.k8s.io/v1", "Gateway") => gateway = Some(doc.value),
            ("kustomize.config.k8s.io/v1beta1", "Kustomization") => kustomization = Some(doc.value),
            other => panic!("{}: {other:?} is not expected in deploy/waypoint", doc.at()),
        }
    }
    let (d, s, sa, g, k) = (
        deployment.expect("a Deployment"),
        service.expect("a Service"),
        account.expect("a ServiceAccount"),
        gateway.expect("a Gateway"),
        kustomization.expect("a kustomization"),
    );
    // The kustomization lists every file of the directory.
    kustomization_lists_its_directory(&k, WAYPOINT_DIR);

    // The Gateway is a waypoint, with the listener Istio gives one.
    let name = g["metadata"]["name"].as_str().expect("the Gateway's name");
    assert_eq!(g["spec"]["gatewayClassName"], "istio-waypoint");
    assert_eq!(
        g["spec"]["listeners"],
        json!([{"name": "mesh", "port": 15008, "protocol": "HBONE"}])
    );

    // The Deployment runs `mesh-agent waypoint` for it, as its service account.
    let spec = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let labels = d
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    assert_eq!(labels["gateway.networking.k8s.io/gateway-name"], name);
    assert_eq!(
        labels["istio.io/dataplane-mode"], "none",
        "a waypoint is never captured"
    );
    assert_eq!(
        labels["gateway.istio.io/managed"], "istio.io-mesh-controller",
        "what Kiali recognises a waypoint by"
    );
    assert_eq!(
        spec.service_account_name.as_deref(),
        sa.metadata.name.as_deref()
    );
    let c = &spec.containers[0];
    let args = args(c);
    assert_eq!(args.first().map(String::as_str), Some("waypoint"));
    assert_eq!(flag_value(args, "--name"), Some(name));
    let help = help_of("waypoint");
    for arg in args.iter().filter(|a| a.starts_with("--")) {
        assert!(
            help_mentions(&help, arg.split('=').next().unwrap()),
            "{arg}:\n{help}"
        );
    }
    // Every required flag is given, in the args or through the environment variable the
    // help names for it.
    let env: BTreeSet<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    required_flags_given(&help, args, &env, "the waypoint");
    // Probes reach the pod's address (the waypoint serves 15021 there).
    let (port, path, host) = http_get(c.readiness_probe.as_ref(), "readiness");
    assert_eq!(
        (port, path.as_str(), host),
        (i32::from(READINESS_PORT), "/healthz/ready", None)
    );
    // The Service selects the pods and carries HBONE.
    let selector = s.spec.as_ref().unwrap().selector.clone().unwrap();
    assert!(
        selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "{selector:?}"
    );
    assert!(
        s.spec
            .as_ref()
            .unwrap()
            .ports
            .iter()
            .flatten()
            .any(|p| p.port == 15008),
        "the Service carries 15008"
    );
}

// ---- the ingress gateway (deploy/gateway/, its own kustomization) ----

#[test]
fn the_gateway_manifests_agree_with_the_binary_bookinfo_and_each_other() {
    let mut deployment: Option<Deployment> = None;
    let mut service: Option<K8sService> = None;
    let mut account: Option<ServiceAccount> = None;
    let mut kustomization: Option<Value> = None;
    let mut cluster_binding: Option<ClusterRoleBinding> = None;
    let mut role: Option<Role> = None;
    let mut role_binding: Option<RoleBinding> = None;
    for doc in documents_under(&deploy_dir().join(GATEWAY_DIR)) {
        let api_version = doc.value["apiVersion"].as_str().unwrap_or_default();
        let kind = doc.value["kind"].as_str().unwrap_or_default();
        match (api_version, kind) {
            ("apps/v1", "Deployment") => deployment = Some(typed(&doc)),
            ("v1", "Service") => service = Some(typed(&doc)),
            ("v1", "ServiceAccount") => account = Some(typed(&doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                cluster_binding = Some(typed(&doc))
            }
            ("rbac.authorization.k8s.io/v1", "Role") => role = Some(typed(&doc)),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => role_binding = Some(typed(&doc)),
            ("kustomize.config.k8s.io/v1beta1", "Kustomization") => kustomization = Some(doc.value),
            other => panic!("{}: {other:?} is not expected in deploy/gateway", doc.at()),
        }
    }
    let (d, s, sa, k) = (
        deployment.expect("a Deployment"),
        service.expect("a Service"),
        account.expect("a ServiceAccount"),
        kustomization.expect("a kustomization"),
    );
    kustomization_lists_its_directory(&k, GATEWAY_DIR);

    // RBAC: the base's read-only proxy role everywhere, and Secrets in its namespace only.
    let namespace = k["namespace"]
        .as_str()
        .expect("the kustomization's namespace");
    let subject_is_the_gateway = |subjects: &[k8s_openapi::api::rbac::v1::Subject]| {
        assert_eq!(subjects.len(), 1, "{subjects:?}");
        let s = &subjects[0];
        assert_eq!(
            (s.kind.as_str(), Some(&s.name), s.namespace.as_deref()),
            ("ServiceAccount", sa.metadata.name.as_ref(), Some(namespace)),
            "a ClusterRoleBinding's subject names its namespace itself"
        );
    };
    let cb = cluster_binding.expect("a ClusterRoleBinding");
    assert_eq!(
        (cb.role_ref.kind.as_str(), cb.role_ref.name.as_str()),
        ("ClusterRole", "mesh-proxy")
    );
    cluster_role(&load(), "mesh-proxy");
    subject_is_the_gateway(cb.subjects.as_deref().unwrap_or_default());
    let (role, rb) = (role.expect("a Role"), role_binding.expect("a RoleBinding"));
    let granted = grants(role.rules.as_deref().unwrap_or_default());
    let wanted: BTreeSet<(String, String, String)> = ["get", "list", "watch"]
        .map(|v| (String::new(), "secrets".to_owned(), v.to_owned()))
        .into();
    assert_eq!(granted, wanted, "secrets, read-only, nothing else");
    assert_eq!(role.metadata.namespace.as_deref(), Some(namespace));
    assert_eq!(rb.metadata.namespace.as_deref(), Some(namespace));
    assert_eq!(
        (rb.role_ref.kind.as_str(), Some(&rb.role_ref.name)),
        ("Role", role.metadata.name.as_ref())
    );
    subject_is_the_gateway(rb.subjects.as_deref().unwrap_or_default());

    // The pods run `mesh-agent gateway` with flags it has, every required one given.
    let template = d.spec.as_ref().unwrap().template.clone();
    let labels = template.metadata.as_ref().unwrap().labels.clone().unwrap();
    let spec = template.spec.as_ref().unwrap();
    assert_eq!(
        labels["istio.io/dataplane-mode"], "none",
        "a gateway is never captured"
    );
    assert_eq!(
        spec.service_account_name.as_deref(),
        sa.metadata.name.as_deref()
    );
    let c = &spec.containers[0];
    let args = args(c);
    assert_eq!(args.first().map(String::as_str), Some("gateway"));
    let help = help_of("gateway");
    for arg in args.iter().filter(|a| a.starts_with("--")) {
        assert!(
            help_mentions(&help, arg.split('=').next().unwrap()),
            "{arg}:\n{help}"
        );
    }
    let env: BTreeSet<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    required_flags_given(&help, args, &env, "the gateway");
    // --pod comes from the pod's name: its labels select Istio's Gateways.
    assert!(env.contains("POD_NAME"), "POD_NAME for --pod");
    let (port, path, host) = http_get(c.readiness_probe.as_ref(), "readiness");
    assert_eq!(
        (port, path.as_str(), host),
        (i32::from(READINESS_PORT), "/healthz/ready", None)
    );

    // The Service selects the pods, and its target ports are the container's.
    let service_spec = s.spec.as_ref().unwrap();
    let selector = service_spec.selector.clone().unwrap();
    assert!(
        selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "{selector:?}"
    );
    let container_ports: BTreeSet<i32> =
        c.ports.iter().flatten().map(|p| p.container_port).collect();
    for p in service_spec.ports.iter().flatten() {
        let target = match &p.target_port {
            Some(IntOrString::Int(n)) => *n,
            other => panic!("service port {}: target {other:?}", p.port),
        };
        assert!(
            container_ports.contains(&target),
            "service port {} -> {target}",
            p.port
        );
    }

    // Bookinfo's Istio Gateway selects these pods, on a port they listen on.
    let bookinfo = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../samples/bookinfo/networking/bookinfo-gateway.yaml"),
    )
    .unwrap();
    let gateway: Value = serde_yaml_ng::Deserializer::from_str(&bookinfo)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
        .find(|v| v["kind"] == "Gateway")
        .expect("Bookinfo's Gateway");
    let wanted = gateway["spec"]["selector"].as_object().unwrap();
    assert!(
        wanted
            .iter()
            .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str()),
        "{wanted:?} does not select {labels:?}"
    );
    let port = gateway["spec"]["servers"][0]["port"]["number"]
        .as_i64()
        .unwrap();
    assert!(
        container_ports.contains(&(port as i32)),
        "Bookinfo's port {port}"
    );
}

#[test]
fn the_samples_istio_objects_fit_the_crd_schemas() {
    let m = load();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples");
    let mut files = Vec::new();
    yaml_files(&root, &mut files);
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for object in yaml_objects(&text) {
            let group = object["apiVersion"].as_str().unwrap_or_default();
            if group.starts_with("networking.istio.io/") || group.starts_with("security.istio.io/")
            {
                validate_object(&m, &object).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "only {checked} Istio objects under samples/");
}
