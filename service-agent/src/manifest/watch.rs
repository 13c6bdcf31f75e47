//! Manifests as a live source: the agent polls a `ManifestSource`, which re-reads the files when
//! they change and hands back the new desired state. Polling metadata is cheap and, unlike
//! inotify, sees ConfigMap volume updates and files on network filesystems alike.

use std::{collections::HashMap, fs, path::PathBuf};

use super::{files, parse::parse_manifest};
use crate::{
    controlplane::{
        ControlPlane, ControlPlaneConfig,
        objects::{ClusterObjects, Located, Object},
    },
    model::DesiredState,
};

pub struct ManifestSource {
    paths: Vec<PathBuf>,
    control_plane: ControlPlane,
    /// None until the first refresh, which therefore always loads.
    fingerprint: Option<files::Fingerprint>,
    last_good: LastGoodFiles,
}

/// What a refresh produced: the state to serve, and what the user should fix.
pub struct Refresh {
    pub state: DesiredState,
    pub problems: Vec<String>,
}

impl ManifestSource {
    /// Fails only when the control plane's state directory is unusable; problems with the
    /// manifests themselves come from `refresh`.
    pub fn new(paths: Vec<PathBuf>, config: ControlPlaneConfig) -> anyhow::Result<Self> {
        Ok(ManifestSource {
            paths,
            control_plane: ControlPlane::new(&config)?,
            fingerprint: None,
            last_good: LastGoodFiles::default(),
        })
    }

    /// Re-reads the manifests when any file changed since the last call (always on the first
    /// call): Ok(None) when nothing changed. Problems (parse or validation) do not fail the call:
    /// they are returned in `Refresh::problems` (and logged), and the affected file's or
    /// Service's last good content is used instead.
    pub fn refresh(&mut self) -> anyhow::Result<Option<Refresh>> {
        let scan = files::scan(&self.paths);
        if self.fingerprint.as_ref() == Some(&scan.fingerprint) {
            return Ok(None);
        }
        let mut problems = scan.problems;
        let objects = self.last_good.load(&scan.files, &mut problems);
        let reconciled = self.control_plane.reconcile(&objects);
        problems.extend(reconciled.problems);
        for problem in &problems {
            tracing::warn!("{problem}");
        }
        self.fingerprint = Some(scan.fingerprint);
        Ok(Some(Refresh {
            state: reconciled.state,
            problems,
        }))
    }
}

/// For `service-agent check PATH...`: parses and validates without persisting anything (a
/// `state_dir` in `config` is neither read nor written). Ok(problems), empty when all is well.
pub fn check(paths: &[PathBuf], config: &ControlPlaneConfig) -> anyhow::Result<Vec<String>> {
    let scan = files::scan(paths);
    let mut problems = scan.problems;
    let objects = LastGoodFiles::default().load(&scan.files, &mut problems);
    let mut control_plane = ControlPlane::new(&ControlPlaneConfig {
        state_dir: None,
        ..config.clone()
    })?;
    problems.extend(control_plane.reconcile(&objects).problems);
    Ok(problems)
}

/// The objects of every file as it last parsed, so that saving a half-edited file does not
/// withdraw the Services it defines.
#[derive(Default)]
struct LastGoodFiles(HashMap<PathBuf, Vec<Located<Object>>>);

impl LastGoodFiles {
    /// Reads and parses `files`; a file that fails contributes its last good objects (or nothing
    /// if it never parsed). Files no longer listed are forgotten.
    fn load(&mut self, files: &[PathBuf], problems: &mut Vec<String>) -> ClusterObjects {
        let mut loaded = HashMap::new();
        let mut objects = ClusterObjects::default();
        for file in files {
            let parsed = fs::read_to_string(file)
                .map_err(|error| vec![format!("{}: {error}", file.display())])
                .and_then(|text| parse_manifest(file, &text));
            let file_objects = match parsed {
                Ok(file_objects) => file_objects,
                Err(file_problems) => {
                    problems.extend(file_problems);
                    let Some(previous) = self.0.remove(file) else {
                        continue;
                    };
                    problems.push(format!(
                        "{}: using its last good content until the problems above are fixed",
                        file.display()
                    ));
                    previous
                }
            };
            for located in &file_objects {
                objects.add(located.clone());
            }
            loaded.insert(file.clone(), file_objects);
        }
        self.0 = loaded;
        objects
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, path::Path};

    use super::*;
    use crate::{
        controlplane::{DEFAULT_NODE_PORT_RANGE, DEFAULT_SERVICE_CIDR, test_support::TempDir},
        model::ServiceName,
    };

    fn config(state_dir: Option<&Path>) -> ControlPlaneConfig {
        ControlPlaneConfig {
            service_cidr: DEFAULT_SERVICE_CIDR.parse().unwrap(),
            state_dir: state_dir.map(Path::to_owned),
            node_port_range: DEFAULT_NODE_PORT_RANGE,
        }
    }

    fn service(name: &str) -> ServiceName {
        ServiceName {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn service_yaml(name: &str, port: &str) -> String {
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec: {{clusterIP: 10.96.0.50, ports: [{{port: {port}}}]}}
"
        )
    }

    /// Rewrites `path` so that the fingerprint changes even within one mtime tick.
    fn rewrite(path: &Path, contents: &str) {
        let temporary = path.with_extension("tmp");
        fs::write(&temporary, contents).unwrap();
        fs::rename(&temporary, path).unwrap();
    }

    #[test]
    fn refreshes_only_on_change() {
        let dir = TempDir::new("watch-change");
        let file = dir.path().join("web.yaml");
        fs::write(&file, service_yaml("web", "80")).unwrap();
        let mut source = ManifestSource::new(vec![dir.path().to_owned()], config(None)).unwrap();

        let first = source
            .refresh()
            .unwrap()
            .expect("the first refresh always loads");
        assert!(first.problems.is_empty(), "{:?}", first.problems);
        assert_eq!(first.state.services[&service("web")].ports[0].port, 80);
        assert!(source.refresh().unwrap().is_none());

        rewrite(&file, &service_yaml("web", "8080"));
        let edited = source.refresh().unwrap().expect("an edit is a change");
        assert_eq!(edited.state.services[&service("web")].ports[0].port, 8080);

        fs::write(
            dir.path().join("other.yaml"),
            service_yaml("other", "81").replace(".50", ".51"),
        )
        .unwrap();
        let added = source.refresh().unwrap().expect("a new file is a change");
        assert_eq!(added.state.services.len(), 2);

        fs::remove_file(&file).unwrap();
        let removed = source
            .refresh()
            .unwrap()
            .expect("a removed file is a change");
        assert_eq!(
            removed.state.services.keys().cloned().collect::<Vec<_>>(),
            [service("other")]
        );
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_content() {
        let dir = TempDir::new("watch-broken");
        let file = dir.path().join("web.yaml");
        let never_good = dir.path().join("never.yaml");
        fs::write(&file, service_yaml("web", "80")).unwrap();
        fs::write(&never_good, service_yaml("never", "eighty")).unwrap();
        let mut source = ManifestSource::new(vec![dir.path().to_owned()], config(None)).unwrap();
        let first = source.refresh().unwrap().unwrap();
        assert_eq!(
            first.state.services.keys().cloned().collect::<Vec<_>>(),
            [service("web")]
        );
        assert_eq!(first.problems.len(), 1, "{:?}", first.problems);
        assert!(
            first.problems[0]
                .contains("never.yaml: document 1 (Service default/never): spec.ports[0].port")
        );

        rewrite(&file, &service_yaml("web", "eighty"));
        let broken = source.refresh().unwrap().unwrap();
        assert_eq!(broken.state, first.state);
        assert!(
            broken.problems.iter().any(|p| p.ends_with(
                "web.yaml: using its last good content until the problems above are fixed"
            )),
            "{:?}",
            broken.problems
        );

        rewrite(&file, &service_yaml("web", "81"));
        let fixed = source.refresh().unwrap().unwrap();
        assert_eq!(fixed.state.services[&service("web")].ports[0].port, 81);
        assert_eq!(fixed.problems.len(), 1, "only never.yaml is still broken");
    }

    #[test]
    fn a_missing_path_is_reported_not_fatal() {
        let dir = TempDir::new("watch-missing");
        let missing = dir.path().join("missing.yaml");
        let mut source = ManifestSource::new(vec![missing.clone()], config(None)).unwrap();
        let refresh = source.refresh().unwrap().unwrap();
        assert!(refresh.state.services.is_empty());
        assert_eq!(refresh.problems.len(), 1);
        assert!(refresh.problems[0].starts_with(&missing.display().to_string()));
    }

    #[test]
    fn allocated_ips_survive_an_agent_restart() {
        let dir = TempDir::new("watch-restart");
        let manifests = dir.path().join("manifests");
        let state_dir = dir.path().join("state");
        fs::create_dir(&manifests).unwrap();
        fs::write(
            manifests.join("b.yaml"),
            "{apiVersion: v1, kind: Service, metadata: {name: b}, spec: {ports: [{port: 80}]}}",
        )
        .unwrap();
        let mut first =
            ManifestSource::new(vec![manifests.clone()], config(Some(&state_dir))).unwrap();
        let b_ip = first.refresh().unwrap().unwrap().state.services[&service("b")].cluster_ip;
        assert_eq!(b_ip, Ipv4Addr::new(10, 96, 0, 2));
        drop(first);

        // "a" sorts first and would take b's IP if the allocation were not remembered.
        fs::write(
            manifests.join("a.yaml"),
            "{apiVersion: v1, kind: Service, metadata: {name: a}, spec: {ports: [{port: 80}]}}",
        )
        .unwrap();
        let mut restarted = ManifestSource::new(vec![manifests], config(Some(&state_dir))).unwrap();
        let state = restarted.refresh().unwrap().unwrap().state;
        assert_eq!(state.services[&service("b")].cluster_ip, b_ip);
        assert_eq!(
            state.services[&service("a")].cluster_ip,
            Ipv4Addr::new(10, 96, 0, 3)
        );
    }

    #[test]
    fn check_reports_problems_and_writes_nothing() {
        let dir = TempDir::new("watch-check");
        let manifests = dir.path().join("web.yaml");
        fs::write(
            &manifests,
            "apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 192.168.0.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: auto}
spec: {ports: [{port: 80}]}
",
        )
        .unwrap();
        let state_dir = dir.path().join("state");
        let problems = check(&[manifests], &config(Some(&state_dir))).unwrap();
        assert_eq!(
            problems,
            [format!(
                "{}/web.yaml: document 1 (Service default/web): spec.clusterIP: 192.168.0.1 is outside the service CIDR 10.96.0.0/12",
                dir.path().display()
            )]
        );
        assert!(!state_dir.exists());
    }
}
