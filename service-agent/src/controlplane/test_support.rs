//! Helpers shared by the control plane's and the manifest module's tests.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use serde::Deserialize;

use super::objects::{ClusterObjects, Located, Object, Origin};

/// A fresh directory under the system temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(purpose: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "service-agent-{purpose}-{}-{unique}",
            std::process::id()
        ));
        // A crashed earlier run with the same pid may have left it behind.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// An object as a manifest would give it, from `test.yaml: document 1`.
pub fn located<T: serde::de::DeserializeOwned>(yaml: &str) -> Located<T> {
    Located {
        origin: Origin::new("test.yaml: document 1"),
        object: serde_yaml::from_str(yaml).unwrap(),
    }
}

/// The objects of a multi-document YAML text, each from `test.yaml: document N`.
pub fn cluster_objects(yaml: &str) -> ClusterObjects {
    let mut objects = ClusterObjects::default();
    for (index, document) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let value = serde_yaml::Value::deserialize(document).unwrap();
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().expect("test objects have a kind");
        let object = match kind {
            "Service" => Object::Service(serde_yaml::from_value(value).unwrap()),
            "Pod" => Object::Pod(serde_yaml::from_value(value).unwrap()),
            "Endpoints" => Object::Endpoints(serde_yaml::from_value(value).unwrap()),
            "EndpointSlice" => Object::EndpointSlice(serde_yaml::from_value(value).unwrap()),
            other => panic!("no test support for {other}"),
        };
        objects.add(Located {
            origin: Origin::new(format!("test.yaml: document {}", index + 1)),
            object,
        });
    }
    objects
}
