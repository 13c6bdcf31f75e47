//! Which files the manifest paths stand for, and a stamp per file that tells cheaply (metadata
//! only) whether it may have changed since the last look.

use std::{
    collections::HashSet,
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::SystemTime,
};

/// The outcome of one look at the manifest paths.
pub struct Scan {
    /// Manifest files in the order they are read: the paths as given, directories expanded to
    /// their manifest files in name order. Each with its stamp; None when it went away between
    /// being listed and being looked at.
    pub files: Vec<(PathBuf, Option<FileStamp>)>,
    /// Paths as given that could not be looked at.
    pub problems: Vec<PathProblem>,
}

/// A path that could not be looked at: missing, or unreadable (permissions, I/O).
pub struct PathProblem {
    pub path: PathBuf,
    pub error: io::Error,
}

impl PathProblem {
    /// Not there at all, as opposed to there but unreadable.
    pub fn is_missing(&self) -> bool {
        self.error.kind() == io::ErrorKind::NotFound
    }
}

impl std::fmt::Display for PathProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.error)
    }
}

/// Two looks at a file with equal stamps saw the same metadata, so (almost certainly) the same
/// content. Inode and size are in it because an editor's save-by-rename may keep the
/// modification time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    size: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

impl FileStamp {
    /// When the file was last written, by the clock of whoever wrote it.
    pub fn modified(&self) -> Option<SystemTime> {
        self.modified
    }
}

pub fn scan(paths: &[PathBuf]) -> Scan {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for path in paths {
        let listed = fs::metadata(path).and_then(|metadata| {
            if metadata.is_dir() {
                manifest_files_in(path)
            } else {
                Ok(vec![path.clone()])
            }
        });
        match listed {
            Ok(listed) => files.extend(listed),
            Err(error) => problems.push(PathProblem {
                path: path.clone(),
                error,
            }),
        }
    }
    // A file named twice (on its own and through its directory) is read once.
    let mut seen = HashSet::new();
    files.retain(|file| seen.insert(file.clone()));
    Scan {
        files: files
            .into_iter()
            .map(|file| {
                let stamp = stamp(&file);
                (file, stamp)
            })
            .collect(),
        problems,
    }
}

/// A directory's YAML and JSON files, without hidden files (which include the `..data` links
/// of a mounted ConfigMap) and editor backups.
fn manifest_files_in(directory: &Path) -> io::Result<Vec<PathBuf>> {
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

/// The file's stamp now; None when it is not there (or not a file anyone can look at).
pub fn stamp(file: &Path) -> Option<FileStamp> {
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

    fn stamps(scan: &Scan) -> Vec<(PathBuf, Option<FileStamp>)> {
        scan.files.clone()
    }

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
        let names: Vec<_> = (scan.files.iter())
            .map(|(file, _)| file.strip_prefix(dir.path()).unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["a.yaml", "b.yml", "c.json", "notes.txt"]);
        assert!(scan.files.iter().all(|(_, stamp)| stamp.is_some()));
        assert!(scan.problems.is_empty());
    }

    #[test]
    fn stamps_change_with_content_and_listing_with_files() {
        let dir = TempDir::new("files-stamps");
        let paths = [dir.path().to_owned()];
        fs::write(dir.path().join("a.yaml"), "one").unwrap();
        let first = stamps(&scan(&paths));
        assert_eq!(stamps(&scan(&paths)), first);

        fs::write(dir.path().join("a.yaml"), "three").unwrap();
        let edited = stamps(&scan(&paths));
        assert_ne!(edited, first);

        fs::write(dir.path().join("b.yaml"), "").unwrap();
        assert_eq!(scan(&paths).files.len(), 2);

        fs::remove_file(dir.path().join("b.yaml")).unwrap();
        assert_eq!(stamps(&scan(&paths)), edited);
    }

    #[test]
    fn a_missing_path_is_a_problem_until_it_appears_and_an_unreadable_one_is_not_missing() {
        let dir = TempDir::new("files-missing");
        let path = dir.path().join("later.yaml");
        let before = scan(std::slice::from_ref(&path));
        assert!(before.files.is_empty());
        assert_eq!(before.problems.len(), 1);
        assert!(before.problems[0].is_missing());
        assert!((before.problems[0].to_string()).starts_with(&format!("{}: ", path.display())));

        fs::write(&path, "").unwrap();
        let after = scan(std::slice::from_ref(&path));
        assert_eq!(after.files.len(), 1);
        assert_eq!(after.files[0].0, path);
        assert!(after.problems.is_empty());

        // Root reads every directory: a file taken for a directory stands in for an unreadable
        // path (ENOTDIR).
        let under_a_file = path.join("inner");
        let unreadable = scan(std::slice::from_ref(&under_a_file));
        assert_eq!(unreadable.problems.len(), 1);
        assert!(!unreadable.problems[0].is_missing());
    }
}
