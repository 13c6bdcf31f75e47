//! The manifests in `deploy/` are read into k8s-openapi's types, so that a misspelt field or a
//! wrong value type fails here rather than in a cluster: each document must survive the round
//! trip through its type unchanged (k8s-openapi silently drops fields it does not know, so the
//! comparison is what catches a typo). The RBAC and the container's privileges are also held to
//! what the README promises.

use std::{fs, path::Path};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::ServiceAccount,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    serde::{Deserialize as _, Serialize, de::DeserializeOwned},
};
use serde_json::Value;

fn deploy_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every YAML document of every file in deploy/, with where it came from.
fn documents() -> Result<Vec<(String, Value)>> {
    let mut documents = Vec::new();
    let mut files: Vec<_> = fs::read_dir(deploy_dir())?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    for file in files {
        if file.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = fs::read_to_string(&file)?;
        for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value = Value::deserialize(document)
                .with_context(|| format!("{}: document {}", file.display(), index + 1))?;
            documents.push((format!("{}: document {}", file.display(), index + 1), value));
        }
    }
    Ok(documents)
}

/// `value` as a `T`, which must give back exactly `value`.
fn round_trip<T: DeserializeOwned + Serialize>(what: &str, value: &Value) -> Result<T> {
    let typed: T = serde_json::from_value(value.clone())
        .with_context(|| format!("{what}: not a valid object"))?;
    let back = serde_json::to_value(&typed)?;
    if let Some(path) = first_difference(value, &back, String::new()) {
        bail!("{what}: {path} is not a field of its type (or has the wrong shape)");
    }
    Ok(typed)
}

/// The path of the first field of `original` that `typed` lacks or holds differently.
fn first_difference(original: &Value, typed: &Value, path: String) -> Option<String> {
    match (original, typed) {
        (Value::Object(original), Value::Object(typed)) => {
            original.iter().find_map(|(key, value)| {
                let path = format!("{path}.{key}");
                match typed.get(key) {
                    Some(typed) => first_difference(value, typed, path),
                    None => Some(path),
                }
            })
        }
        (Value::Array(original), Value::Array(typed)) if original.len() == typed.len() => original
            .iter()
            .zip(typed)
            .enumerate()
            .find_map(|(index, (original, typed))| {
                first_difference(original, typed, format!("{path}[{index}]"))
            }),
        _ if original == typed => None,
        _ => Some(path),
    }
}

#[test]
fn every_deploy_manifest_is_a_valid_kubernetes_object() -> Result<()> {
    let documents = documents()?;
    ensure!(!documents.is_empty(), "no manifests in deploy/");
    let mut kinds = Vec::new();
    for (what, value) in &documents {
        let kind = value["kind"].as_str().unwrap_or_default();
        match kind {
            "DaemonSet" => drop(round_trip::<DaemonSet>(what, value)?),
            "ServiceAccount" => drop(round_trip::<ServiceAccount>(what, value)?),
            "ClusterRole" => drop(round_trip::<ClusterRole>(what, value)?),
            "ClusterRoleBinding" => drop(round_trip::<ClusterRoleBinding>(what, value)?),
            other => bail!("{what}: unexpected kind {other:?}"),
        }
        kinds.push(kind.to_owned());
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "DaemonSet",
            "ServiceAccount"
        ]
    );
    Ok(())
}

#[test]
fn the_cluster_role_only_lists_and_watches_what_the_agent_reads() -> Result<()> {
    let (what, value) = documents()?
        .into_iter()
        .find(|(_, value)| value["kind"] == "ClusterRole")
        .context("no ClusterRole")?;
    let role: ClusterRole = round_trip(&what, &value)?;
    let mut granted = Vec::new();
    for rule in role.rules.unwrap_or_default() {
        let mut verbs = rule.verbs.clone();
        verbs.sort();
        ensure!(verbs == ["list", "watch"], "{what}: verbs {verbs:?}");
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.iter().flatten() {
                granted.push(format!("{group}/{resource}"));
            }
        }
    }
    granted.sort();
    assert_eq!(
        granted,
        ["/nodes", "/services", "discovery.k8s.io/endpointslices"]
    );
    Ok(())
}

/// The DaemonSet named `name`.
fn daemon_set(name: &str) -> Result<(String, DaemonSet)> {
    let (what, value) = documents()?
        .into_iter()
        .find(|(_, value)| value["kind"] == "DaemonSet" && value["metadata"]["name"] == name)
        .with_context(|| format!("no DaemonSet {name}"))?;
    let daemon_set = round_trip(&what, &value)?;
    Ok((what, daemon_set))
}

#[test]
fn the_agent_container_has_only_the_capabilities_it_needs() -> Result<()> {
    let (what, daemon_set) = daemon_set("service-agent")?;
    let pod = daemon_set
        .spec
        .context("no spec")?
        .template
        .spec
        .context("no pod spec")?;
    ensure!(pod.host_network == Some(true), "{what}: not hostNetwork");
    let container = &pod.containers[0];
    let security = container
        .security_context
        .as_ref()
        .context("no securityContext")?;
    ensure!(security.privileged != Some(true), "{what}: privileged");
    let capabilities = security.capabilities.as_ref().context("no capabilities")?;
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(
        capabilities.add.as_deref(),
        Some(
            &[
                "BPF".to_owned(),
                "NET_ADMIN".to_owned(),
                "PERFMON".to_owned()
            ][..]
        )
    );
    let args = container.args.clone().unwrap_or_default();
    ensure!(
        args.iter().any(|arg| arg == "--in-cluster"),
        "{what}: the agent does not read the cluster: {args:?}"
    );
    Ok(())
}

/// The agent reaches the API server at its own address, not through the `kubernetes`
/// ClusterIP that only it translates; and the uninstall path runs `service-agent cleanup`.
#[test]
fn the_agent_does_not_need_itself_to_reach_the_api_server_and_uninstall_cleans_up() -> Result<()> {
    let (what, agent) = daemon_set("service-agent")?;
    let pod = agent
        .spec
        .context("no spec")?
        .template
        .spec
        .context("no pod spec")?;
    let env = pod.containers[0].env.clone().unwrap_or_default();
    for name in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"] {
        ensure!(
            env.iter()
                .any(|var| var.name == name && var.value.is_some()),
            "{what}: {name} is not set in the container's env"
        );
    }
    let (what, cleanup) = daemon_set("service-agent-cleanup")?;
    let pod = cleanup
        .spec
        .context("no spec")?
        .template
        .spec
        .context("no pod spec")?;
    let init = pod.init_containers.unwrap_or_default();
    ensure!(
        init.iter().any(
            |container| container.args.as_deref().unwrap_or_default().first()
                == Some(&"cleanup".to_owned())
        ),
        "{what}: no init container runs `service-agent cleanup`"
    );
    Ok(())
}
