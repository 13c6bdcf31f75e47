//! Manifests as a live source: the agent polls a `ManifestSource`, which re-reads the files that
//! changed and hands back the new desired state. Polling metadata is cheap and, unlike inotify,
//! sees ConfigMap volume updates and files on network filesystems alike.
//!
//! What is handed back is never a half-seen picture: a file's new version (or its absence) is
//! acted on once it has settled (see `settle`), and nothing at all is handed back before every
//! path could be read once, so that an agent started over the maps of a previous one does not
//! withdraw what it cannot see yet.

use std::path::PathBuf;

use super::{
    files::{self, PathProblem},
    notify::ManifestEvents,
    settle::{FileVersions, Finished, Moment, ReadError, read_manifest},
};
use crate::{
    controlplane::{ControlPlane, ControlPlaneConfig, objects::ClusterObjects},
    model::DesiredState,
};

pub struct ManifestSource {
    paths: Vec<PathBuf>,
    control_plane: ControlPlane,
    versions: FileVersions,
    /// Files whose writers inotify saw finish since the last refresh (see [`Self::watch`]).
    finished: Finished,
    /// A state was handed back: from then on the maps hold what these manifests say.
    served: bool,
    /// The path problems last handed back: a change is news even when no file changed.
    path_problems: Vec<String>,
    /// Why the refreshes hand back nothing yet, as last logged.
    waiting_for: Vec<String>,
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
            versions: FileVersions::default(),
            finished: Finished::default(),
            served: false,
            path_problems: Vec::new(),
            waiting_for: Vec::new(),
        })
    }

    /// inotify on the manifest paths, telling this source which files their writers finished:
    /// those versions are used at the next refresh instead of after the settle time.
    pub fn watch(&self) -> anyhow::Result<ManifestEvents> {
        ManifestEvents::watch_into(&self.paths, Some(self.finished.clone()))
    }

    /// The desired state when the manifests changed since the last call, else Ok(None), which
    /// the caller acts on by doing nothing: the maps keep what they hold.
    ///
    /// A file's new version is used once it has settled (looked the same for
    /// `settle::SETTLE_TIME`, or finished by its writer as inotify saw through [`Self::watch`]);
    /// until then, and while a file is gone for less than that, its last good objects stand.
    /// Before the first state is handed back, nothing is until every path can be read and every
    /// file has settled: a missing or unreadable path is logged and tried again at the next
    /// call (a readable empty directory is an empty state, handed back). Problems (parse,
    /// validation) do not fail the call: they are returned in `Refresh::problems` (and logged),
    /// and the affected file's or Service's last good content is used instead.
    pub fn refresh(&mut self) -> anyhow::Result<Option<Refresh>> {
        Ok(self.refresh_at(Moment::now()))
    }

    pub(super) fn refresh_at(&mut self, now: Moment) -> Option<Refresh> {
        let scan = files::scan(&self.paths);
        if !self.served && !scan.problems.is_empty() {
            self.wait_for(scan.problems.iter().map(PathProblem::to_string));
            return None;
        }
        let finished = std::mem::take(&mut *self.finished.lock().expect("never poisoned"));
        let update = self.versions.update(&scan, now, &finished, !self.served);
        let path_problems: Vec<String> = scan.problems.iter().map(ToString::to_string).collect();
        if !self.served {
            let unreadable: Vec<String> = self.versions.unreadable().cloned().collect();
            if !unreadable.is_empty() {
                self.wait_for(unreadable.into_iter());
                return None;
            }
            if update.settling {
                tracing::debug!("waiting for the manifests to settle before the first sync");
                return None;
            }
        } else if !update.changed && path_problems == self.path_problems {
            return None;
        }
        self.served = true;
        self.waiting_for.clear();
        self.path_problems.clone_from(&path_problems);
        let mut problems = path_problems;
        problems.extend(self.versions.problems().cloned());
        let reconciled = self.control_plane.reconcile(&self.versions.objects());
        problems.extend(reconciled.problems);
        for problem in &problems {
            tracing::warn!("{problem}");
        }
        Some(Refresh {
            state: reconciled.state,
            problems,
        })
    }

    /// Logs why nothing is handed back yet, once per reason.
    fn wait_for(&mut self, reasons: impl Iterator<Item = String>) {
        let reasons: Vec<String> = reasons.collect();
        if reasons != self.waiting_for {
            for reason in &reasons {
                tracing::warn!(
                    "{reason}: nothing is programmed from the manifests until it can be read \
                     (the maps keep what they hold)"
                );
            }
            self.waiting_for = reasons;
        }
    }
}

/// For `service-agent check PATH...`: parses and validates without persisting anything (a
/// `state_dir` in `config` is neither read nor written). Ok(problems), empty when all is well.
pub fn check(paths: &[PathBuf], config: &ControlPlaneConfig) -> anyhow::Result<Vec<String>> {
    let scan = files::scan(paths);
    let mut problems: Vec<String> = scan.problems.iter().map(ToString::to_string).collect();
    let mut objects = ClusterObjects::default();
    for (file, _) in &scan.files {
        match read_manifest(file) {
            Ok(file_objects) => file_objects.into_iter().for_each(|o| objects.add(o)),
            Err(ReadError::Unreadable(problem)) => problems.push(problem),
            Err(ReadError::Invalid(file_problems)) => problems.extend(file_problems),
        }
    }
    let mut control_plane = ControlPlane::new(&ControlPlaneConfig {
        state_dir: None,
        ..config.clone()
    })?;
    problems.extend(control_plane.reconcile(&objects).problems);
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        net::Ipv4Addr,
        path::Path,
        time::{Duration, SystemTime},
    };

    use super::*;
    use crate::{
        controlplane::{DEFAULT_NODE_PORT_RANGE, DEFAULT_SERVICE_CIDR, test_support::TempDir},
        manifest::settle::SETTLE_TIME,
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

    fn names(refresh: &Refresh) -> Vec<String> {
        (refresh.state.services.keys())
            .map(|name| name.name.clone())
            .collect()
    }

    /// Rewrites `path` so that its stamp changes even within one mtime tick.
    fn rewrite(path: &Path, contents: &str) {
        let temporary = path.with_extension("tmp");
        fs::write(&temporary, contents).unwrap();
        fs::rename(&temporary, path).unwrap();
    }

    /// Writes a file last modified an hour ago, as a file that was there before the agent.
    fn write_old(path: &Path, contents: &str) {
        fs::write(path, contents).unwrap();
        let file = fs::File::options().write(true).open(path).unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
    }

    /// A source over `dir` that has served its first state (at `start`).
    fn serving(dir: &Path, start: Moment) -> (ManifestSource, Refresh) {
        let mut source = ManifestSource::new(vec![dir.to_owned()], config(None)).unwrap();
        let first = source
            .refresh_at(start)
            .expect("old files are used at once");
        (source, first)
    }

    #[test]
    fn refreshes_only_on_change_once_the_change_settled() {
        let dir = TempDir::new("watch-change");
        let file = dir.path().join("web.yaml");
        write_old(&file, &service_yaml("web", "80"));
        let t = Moment::now();
        let (mut source, first) = serving(dir.path(), t);
        assert!(first.problems.is_empty(), "{:?}", first.problems);
        assert_eq!(first.state.services[&service("web")].ports[0].port, 80);
        assert!(source.refresh_at(t).is_none());

        rewrite(&file, &service_yaml("web", "8080"));
        assert!(
            source
                .refresh_at(t.after(Duration::from_millis(1)))
                .is_none()
        );
        let edited = (source.refresh_at(t.after(SETTLE_TIME * 2)))
            .expect("an edit is a change once it settled");
        assert_eq!(edited.state.services[&service("web")].ports[0].port, 8080);
        assert!(source.refresh_at(t.after(SETTLE_TIME * 3)).is_none());

        fs::write(
            dir.path().join("other.yaml"),
            service_yaml("other", "81").replace(".50", ".51"),
        )
        .unwrap();
        assert!(source.refresh_at(t.after(SETTLE_TIME * 3)).is_none());
        let added = (source.refresh_at(t.after(SETTLE_TIME * 4))).expect("a new file is a change");
        assert_eq!(names(&added), ["other", "web"]);
    }

    #[test]
    fn a_delete_then_create_within_the_settle_time_withdraws_nothing() {
        let dir = TempDir::new("watch-recreate");
        let file = dir.path().join("web.yaml");
        write_old(&file, &service_yaml("web", "80"));
        let t = Moment::now();
        let (mut source, _) = serving(dir.path(), t);

        fs::remove_file(&file).unwrap();
        assert!(
            source
                .refresh_at(t.after(Duration::from_millis(10)))
                .is_none()
        );
        fs::write(&file, service_yaml("web", "81")).unwrap();
        assert!(
            source
                .refresh_at(t.after(Duration::from_millis(260)))
                .is_none()
        );
        let saved = (source.refresh_at(t.after(Duration::from_millis(260) + SETTLE_TIME)))
            .expect("the new version, settled");
        assert_eq!(saved.state.services[&service("web")].ports[0].port, 81);
    }

    #[test]
    fn a_file_caught_half_written_is_not_acted_on() {
        let dir = TempDir::new("watch-half-written");
        let file = dir.path().join("web.yaml");
        let both = format!(
            "{}---\n{}",
            service_yaml("web", "80"),
            service_yaml("api", "81").replace(".50", ".51")
        );
        write_old(&file, &both);
        let t = Moment::now();
        let (mut source, first) = serving(dir.path(), t);
        assert_eq!(names(&first), ["api", "web"]);

        // Truncated and half rewritten: the first document parses on its own.
        fs::write(&file, service_yaml("web", "80")).unwrap();
        assert!(
            source
                .refresh_at(t.after(Duration::from_millis(250)))
                .is_none()
        );
        // The writer finishes.
        rewrite(&file, &both.replace("port: 81", "port: 82"));
        assert!(
            source
                .refresh_at(t.after(Duration::from_millis(500)))
                .is_none()
        );
        let written = (source.refresh_at(t.after(Duration::from_millis(500) + SETTLE_TIME)))
            .expect("the finished version");
        assert_eq!(names(&written), ["api", "web"]);
        assert_eq!(written.state.services[&service("api")].ports[0].port, 82);
    }

    #[test]
    fn a_file_gone_for_the_settle_time_is_withdrawn() {
        let dir = TempDir::new("watch-gone");
        write_old(&dir.path().join("web.yaml"), &service_yaml("web", "80"));
        let t = Moment::now();
        let (mut source, _) = serving(dir.path(), t);

        fs::remove_file(dir.path().join("web.yaml")).unwrap();
        assert!(
            source
                .refresh_at(t.after(Duration::from_millis(10)))
                .is_none()
        );
        assert!(
            source
                .refresh_at(t.after(Duration::from_millis(260)))
                .is_none()
        );
        let gone = (source.refresh_at(t.after(Duration::from_millis(10) + SETTLE_TIME)))
            .expect("gone long enough");
        assert!(gone.state.services.is_empty());
        assert!(gone.problems.is_empty(), "{:?}", gone.problems);
    }

    #[test]
    fn the_first_refresh_over_a_missing_path_hands_back_nothing_until_it_appears() {
        let dir = TempDir::new("watch-missing");
        let missing = dir.path().join("manifests");
        let mut source = ManifestSource::new(vec![missing.clone()], config(None)).unwrap();
        let t = Moment::now();
        assert!(source.refresh_at(t).is_none());
        assert!(
            source
                .refresh_at(t.after(Duration::from_millis(5)))
                .is_none()
        );
        assert_eq!(source.waiting_for.len(), 1);
        assert!(source.waiting_for[0].starts_with(&missing.display().to_string()));

        fs::create_dir(&missing).unwrap();
        fs::write(missing.join("web.yaml"), service_yaml("web", "80")).unwrap();
        let later = t.after(Duration::from_millis(10));
        assert!(
            source.refresh_at(later).is_none(),
            "a file just written settles first"
        );
        let first = source.refresh_at(later.after(SETTLE_TIME)).unwrap();
        assert_eq!(names(&first), ["web"]);
    }

    #[test]
    fn an_empty_readable_directory_is_an_empty_state() {
        let dir = TempDir::new("watch-empty");
        let mut source = ManifestSource::new(vec![dir.path().to_owned()], config(None)).unwrap();
        let first = source.refresh_at(Moment::now()).expect("an empty state");
        assert!(first.state.services.is_empty());
        assert!(first.problems.is_empty(), "{:?}", first.problems);
    }

    #[test]
    fn a_path_that_goes_missing_after_the_first_sync_is_reported_and_its_files_withdrawn() {
        let dir = TempDir::new("watch-path-gone");
        let manifests = dir.path().join("manifests");
        fs::create_dir(&manifests).unwrap();
        write_old(&manifests.join("web.yaml"), &service_yaml("web", "80"));
        let t = Moment::now();
        let (mut source, _) = serving(&manifests, t);

        fs::remove_dir_all(&manifests).unwrap();
        let reported = source.refresh_at(t).expect("a new problem is news");
        assert_eq!(names(&reported), ["web"], "not withdrawn yet");
        assert_eq!(reported.problems.len(), 1, "{:?}", reported.problems);
        let withdrawn = source.refresh_at(t.after(SETTLE_TIME)).unwrap();
        assert!(withdrawn.state.services.is_empty());
    }

    #[test]
    fn a_path_that_cannot_be_read_keeps_the_objects_of_its_files() {
        let dir = TempDir::new("watch-path-unreadable");
        let manifests = dir.path().join("manifests");
        fs::create_dir(&manifests).unwrap();
        write_old(&manifests.join("web.yaml"), &service_yaml("web", "80"));
        let t = Moment::now();
        let (mut source, _) = serving(&manifests, t);

        // Root reads every directory: a symbolic link loop stands in for an unreadable path.
        fs::remove_dir_all(&manifests).unwrap();
        std::os::unix::fs::symlink(&manifests, &manifests).unwrap();
        let reported = source.refresh_at(t).expect("a new problem is news");
        assert_eq!(reported.problems.len(), 1, "{:?}", reported.problems);
        assert_eq!(names(&reported), ["web"]);
        let later = source.refresh_at(t.after(SETTLE_TIME * 4));
        assert!(
            later.is_none(),
            "unreadable is not gone: nothing is withdrawn"
        );
    }

    #[test]
    fn a_version_whose_writer_finished_is_used_at_once() {
        let dir = TempDir::new("watch-finished");
        let file = dir.path().join("web.yaml");
        write_old(&file, &service_yaml("web", "80"));
        let t = Moment::now();
        let (mut source, _) = serving(dir.path(), t);

        rewrite(&file, &service_yaml("web", "81"));
        let stamp = files::stamp(&file);
        source.finished.lock().unwrap().insert(file.clone(), stamp);
        let edited = source.refresh_at(t).expect("vouched for by inotify");
        assert_eq!(edited.state.services[&service("web")].ports[0].port, 81);

        // A finish seen for an earlier version vouches for nothing written since.
        source.finished.lock().unwrap().insert(file.clone(), stamp);
        fs::write(&file, service_yaml("web", "8080")).unwrap();
        assert!(source.refresh_at(t).is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn inotify_tells_the_source_which_files_were_finished() {
        let dir = TempDir::new("watch-inotify");
        let t = Moment::now();
        let (mut source, _) = serving(dir.path(), t);
        let events = source.watch().unwrap();
        rewrite(&dir.path().join("web.yaml"), &service_yaml("web", "80"));
        let woke = tokio::time::timeout(Duration::from_secs(5), events.changed()).await;
        assert!(matches!(woke, Ok(Ok(()))), "no wake-up: {woke:?}");
        let added = source.refresh_at(t).expect("renamed into place: finished");
        assert_eq!(names(&added), ["web"]);
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_content() {
        let dir = TempDir::new("watch-broken");
        let file = dir.path().join("web.yaml");
        write_old(&file, &service_yaml("web", "80"));
        write_old(
            &dir.path().join("never.yaml"),
            &service_yaml("never", "eighty"),
        );
        let t = Moment::now();
        let (mut source, first) = serving(dir.path(), t);
        assert_eq!(names(&first), ["web"]);
        assert_eq!(first.problems.len(), 1, "{:?}", first.problems);
        assert!(
            first.problems[0]
                .contains("never.yaml: document 1 (Service default/never): spec.ports[0].port")
        );

        rewrite(&file, &service_yaml("web", "eighty"));
        assert!(source.refresh_at(t).is_none());
        let broken = source.refresh_at(t.after(SETTLE_TIME)).unwrap();
        assert_eq!(broken.state, first.state);
        assert!(
            broken.problems.iter().any(|p| p.ends_with(
                "web.yaml: using its last good content until the problems above are fixed"
            )),
            "{:?}",
            broken.problems
        );

        rewrite(&file, &service_yaml("web", "81"));
        assert!(source.refresh_at(t.after(SETTLE_TIME)).is_none());
        let fixed = source.refresh_at(t.after(SETTLE_TIME * 2)).unwrap();
        assert_eq!(fixed.state.services[&service("web")].ports[0].port, 81);
        assert_eq!(fixed.problems.len(), 1, "only never.yaml is still broken");
    }

    #[test]
    fn allocated_ips_survive_an_agent_restart() {
        let dir = TempDir::new("watch-restart");
        let manifests = dir.path().join("manifests");
        let state_dir = dir.path().join("state");
        fs::create_dir(&manifests).unwrap();
        write_old(
            &manifests.join("b.yaml"),
            "{apiVersion: v1, kind: Service, metadata: {name: b}, spec: {ports: [{port: 80}]}}",
        );
        let mut first =
            ManifestSource::new(vec![manifests.clone()], config(Some(&state_dir))).unwrap();
        let b_ip = first.refresh().unwrap().unwrap().state.services[&service("b")].cluster_ip;
        assert_eq!(b_ip, Ipv4Addr::new(10, 96, 0, 2));
        drop(first);

        // "a" sorts first and would take b's IP if the allocation were not remembered.
        write_old(
            &manifests.join("a.yaml"),
            "{apiVersion: v1, kind: Service, metadata: {name: a}, spec: {ports: [{port: 80}]}}",
        );
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
