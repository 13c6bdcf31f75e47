//! Which files the manifest paths stand for, and a fingerprint that tells cheaply (metadata only)
//! whether any of them may have changed since the last look.

use std::{
    collections::HashSet,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::SystemTime,
};

/// The outcome of one look at the manifest paths.
pub struct Scan {
    /// Manifest files in the order they are read: the paths as given, directories expanded to
    /// their manifest files in name order.
    pub files: Vec<PathBuf>,
    pub fingerprint: Fingerprint,
    /// Paths that could not be looked at (missing, unreadable directory).
    pub problems: Vec<String>,
}

/// Two scans with equal fingerprints saw the same files with the same metadata. Inode and size
/// are in it because an editor's save-by-rename may keep the modification time.
#[derive(Debug, PartialEq, Eq)]
pub struct Fingerprint(Vec<(PathBuf, Option<FileStamp>)>);

#[derive(Debug, PartialEq, Eq)]
struct FileStamp {
    size: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

pub fn scan(paths: &[PathBuf]) -> Scan {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    let mut stamps = Vec::new();
    for path in paths {
        let metadata = match fs::metadata(path) {
            Ok(metadata) => metadata,
            Err(error) => {
                problems.push(format!("{}: {error}", path.display()));
                // A path that appears later must count as a change.
                stamps.push((path.clone(), None));
                continue;
            }
        };
        if !metadata.is_dir() {
            files.push(path.clone());
            continue;
        }
        match manifest_files_in(path) {
            Ok(listed) => files.extend(listed),
            Err(error) => {
                problems.push(format!("{}: {error}", path.display()));
                stamps.push((path.clone(), None));
            }
        }
    }
    // A file named twice (on its own and through its directory) is read once.
    let mut seen = HashSet::new();
    files.retain(|file| seen.insert(file.clone()));
    stamps.extend(files.iter().map(|file| (file.clone(), stamp(file))));
    Scan {
        files,
        fingerprint: Fingerprint(stamps),
        problems,
    }
}

/// A directory's YAML and JSON files, without hidden files (which include the `..data` links
/// of a mounted ConfigMap) and editor backups.
fn manifest_files_in(directory: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(directory)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
            continue;
        };
        let is_manifest = [".yaml", ".yml", ".json"]
            .iter()
            .any(|extension| name.ends_with(extension));
        // Follows symbolic links: ConfigMap volumes link every key to the current revision.
        if is_manifest && !name.starts_with('.') && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn stamp(file: &Path) -> Option<FileStamp> {
    let metadata = fs::metadata(file).ok()?;
    Some(FileStamp {
        size: metadata.len(),
        modified: metadata.modified().ok(),
        inode: metadata.ino(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controlplane::test_support::TempDir;

    #[test]
    fn lists_manifests_in_name_order_and_skips_the_rest() {
        let dir = TempDir::new("files-list");
        for name in [
            "b.yml",
            "a.yaml",
            "c.json",
            ".hidden.yaml",
            "a.yaml~",
            "notes.txt",
            "#x.yaml#",
        ] {
            fs::write(dir.path().join(name), "").unwrap();
        }
        fs::create_dir(dir.path().join("sub.yaml")).unwrap();
        let explicit = dir.path().join("notes.txt");
        let scan = scan(&[
            dir.path().to_owned(),
            explicit.clone(),
            dir.path().join("a.yaml"),
        ]);
        let names: Vec<_> = scan
            .files
            .iter()
            .map(|file| file.strip_prefix(dir.path()).unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["a.yaml", "b.yml", "c.json", "notes.txt"]);
        assert!(scan.problems.is_empty(), "{:?}", scan.problems);
    }

    #[test]
    fn fingerprint_changes_with_content_and_directory_listing() {
        let dir = TempDir::new("files-fingerprint");
        let paths = [dir.path().to_owned()];
        fs::write(dir.path().join("a.yaml"), "one").unwrap();
        let first = scan(&paths).fingerprint;
        assert_eq!(scan(&paths).fingerprint, first);

        fs::write(dir.path().join("a.yaml"), "three").unwrap();
        let edited = scan(&paths).fingerprint;
        assert_ne!(edited, first);

        fs::write(dir.path().join("b.yaml"), "").unwrap();
        let added = scan(&paths).fingerprint;
        assert_ne!(added, edited);

        fs::remove_file(dir.path().join("b.yaml")).unwrap();
        assert_eq!(scan(&paths).fingerprint, edited);
    }

    #[test]
    fn a_missing_path_is_a_problem_until_it_appears() {
        let dir = TempDir::new("files-missing");
        let path = dir.path().join("later.yaml");
        let before = scan(std::slice::from_ref(&path));
        assert!(before.files.is_empty());
        assert_eq!(before.problems.len(), 1);
        assert!(before.problems[0].starts_with(&format!("{}: ", path.display())));

        fs::write(&path, "").unwrap();
        let after = scan(std::slice::from_ref(&path));
        assert_eq!(after.files, [path]);
        assert!(after.problems.is_empty());
        assert_ne!(after.fingerprint, before.fingerprint);
    }
}
