//! Which version of each manifest file the agent serves. A new version is used once it has
//! settled: it has looked the same for [`SETTLE_TIME`], or inotify saw its writer finish (a close
//! after writing, a rename into place). Until then the file's last good objects stay, so that
//! neither the poll catching a file half-written nor a save that deletes a file before writing it
//! anew withdraws a Service. A file gone for [`SETTLE_TIME`] is withdrawn.

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use super::{
    files::{FileStamp, Scan},
    parse::parse_manifest,
};
use crate::controlplane::objects::{ClusterObjects, Located, Object};

/// How long a new version (or a file's absence) must last before it is acted on: two polls of
/// the run loop (250 ms apart) after the one that first saw it. A writer in progress changes the
/// file's size or mtime between two polls; a delete-then-create save takes milliseconds.
/// Measured by the clock, not by looks, since inotify wake-ups look too, many in a burst.
pub const SETTLE_TIME: Duration = Duration::from_millis(500);

/// A point in time on both clocks: our own looks are timed by the monotonic clock; a file's
/// modification time can only be compared with the wall clock.
#[derive(Clone, Copy, Debug)]
pub struct Moment {
    pub monotonic: Instant,
    pub wall: SystemTime,
}

impl Moment {
    pub fn now() -> Self {
        Moment {
            monotonic: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    #[cfg(test)]
    pub fn after(self, elapsed: Duration) -> Self {
        Moment {
            monotonic: self.monotonic + elapsed,
            wall: self.wall + elapsed,
        }
    }
}

/// Versions whose writers inotify saw finish since the last look: each file with its stamp
/// right after the event (a version written later is not vouched for).
pub type Finished = Arc<Mutex<HashMap<PathBuf, Option<FileStamp>>>>;

/// Every manifest file's versions: what was last seen, what was last read, and the objects of
/// the last version that parsed.
#[derive(Default)]
pub struct FileVersions {
    /// In the order of the last scan, then the files gone but not yet withdrawn.
    files: Vec<(PathBuf, Tracked)>,
}

struct Tracked {
    /// What the last look saw (None: the file was not there), and since when it looks so.
    seen: Option<FileStamp>,
    seen_since: Instant,
    /// The version last read, whether it parsed or not: a version is read once.
    read: Option<FileStamp>,
    /// The objects of the last version that parsed.
    objects: Vec<Located<Object>>,
    /// What is wrong with the version last read; empty when it parsed.
    problems: Vec<String>,
    /// The version last read could not be read at all (it is tried again at every look).
    unreadable: bool,
}

/// What one look changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// A version was read or a file withdrawn: the objects or problems changed.
    pub changed: bool,
    /// Some file has a version that has not settled (a new one, or its absence): its last good
    /// objects stand in for it.
    pub settling: bool,
}

impl FileVersions {
    /// Takes one look (`scan`, made at `now`): reads each file whose new version has settled and
    /// withdraws each file gone for [`SETTLE_TIME`]. A version in `finished` has settled at once.
    /// With `trust_modified` a file last modified [`SETTLE_TIME`] before `now` has settled too:
    /// for the first look, which has no earlier one to compare with (our own looks are trusted
    /// over a file server's clock once there are some).
    ///
    /// A file not listed because its path could not be read (permissions, not absence) keeps
    /// its objects: that it cannot be read does not mean that it is gone.
    pub fn update(
        &mut self,
        scan: &Scan,
        now: Moment,
        finished: &HashMap<PathBuf, Option<FileStamp>>,
        trust_modified: bool,
    ) -> Update {
        let old_order: Vec<PathBuf> = self.files.iter().map(|(path, _)| path.clone()).collect();
        let mut previous: HashMap<PathBuf, Tracked> = self.files.drain(..).collect();
        let listed: HashSet<&PathBuf> = scan.files.iter().map(|(path, _)| path).collect();
        let mut looked: Vec<(PathBuf, Option<FileStamp>)> = scan.files.clone();
        let mut kept = Vec::new();
        for path in old_order {
            if listed.contains(&path) {
                continue;
            }
            let unreadable_path = (scan.problems.iter())
                .any(|problem| !problem.is_missing() && path.starts_with(&problem.path));
            if unreadable_path {
                kept.push(path);
            } else {
                looked.push((path, None));
            }
        }
        let mut update = Update::default();
        for (path, stamp) in looked {
            let mut tracked = previous.remove(&path).unwrap_or_else(|| Tracked {
                seen: stamp,
                seen_since: now.monotonic,
                read: None,
                objects: Vec::new(),
                problems: Vec::new(),
                unreadable: false,
            });
            if tracked.seen != stamp {
                tracked.seen = stamp;
                tracked.seen_since = now.monotonic;
            }
            let modified_long_ago = || {
                let modified = stamp.and_then(|stamp| stamp.modified());
                let age = modified.and_then(|modified| now.wall.duration_since(modified).ok());
                trust_modified && age.is_some_and(|age| age >= SETTLE_TIME)
            };
            let settled = now.monotonic.duration_since(tracked.seen_since) >= SETTLE_TIME
                || (stamp.is_some() && finished.get(&path) == Some(&stamp))
                || modified_long_ago();
            match stamp {
                None if settled => {
                    // Gone long enough: withdrawn.
                    update.changed = true;
                    continue;
                }
                None => update.settling = true,
                Some(_) if tracked.read == stamp && !tracked.unreadable => {}
                Some(_) if tracked.read == stamp || settled => {
                    update.changed |= tracked.read_version(&path, stamp);
                }
                Some(_) => update.settling = true,
            }
            self.files.push((path, tracked));
        }
        for path in kept {
            let tracked = previous.remove(&path).expect("kept files were tracked");
            self.files.push((path, tracked));
        }
        update
    }

    /// The objects of every file's version in use, in file order.
    pub fn objects(&self) -> ClusterObjects {
        let mut objects = ClusterObjects::default();
        for (_, tracked) in &self.files {
            for located in &tracked.objects {
                objects.add(located.clone());
            }
        }
        objects
    }

    /// What is wrong with the versions last read, in file order.
    pub fn problems(&self) -> impl Iterator<Item = &String> {
        (self.files.iter()).flat_map(|(_, tracked)| &tracked.problems)
    }

    /// Why each file whose last version could not be read at all could not (naming it).
    pub fn unreadable(&self) -> impl Iterator<Item = &String> {
        (self.files.iter())
            .filter(|(_, tracked)| tracked.unreadable)
            .filter_map(|(_, tracked)| tracked.problems.first())
    }
}

impl Tracked {
    /// Reads the version `stamp` of `path`; true when the objects or problems changed. A
    /// version that fails keeps the last good objects.
    fn read_version(&mut self, path: &Path, stamp: Option<FileStamp>) -> bool {
        let retry = self.read == stamp;
        self.read = stamp;
        let failed = match read_manifest(path) {
            Ok(objects) => {
                self.objects = objects;
                self.problems.clear();
                self.unreadable = false;
                return true;
            }
            // Still unreadable, for the same reason: nothing new to act on.
            Err(ReadError::Unreadable(problem))
                if retry && self.problems.first() == Some(&problem) =>
            {
                return false;
            }
            Err(ReadError::Unreadable(problem)) => {
                self.unreadable = true;
                vec![problem]
            }
            Err(ReadError::Invalid(problems)) => {
                self.unreadable = false;
                problems
            }
        };
        self.problems = failed;
        if !self.objects.is_empty() {
            self.problems.push(format!(
                "{}: using its last good content until the problems above are fixed",
                path.display()
            ));
        }
        true
    }
}

pub enum ReadError {
    /// The file could not be read (the message names it).
    Unreadable(String),
    /// It was read but does not parse: every problem found, each naming the file.
    Invalid(Vec<String>),
}

/// Reads and parses one manifest file.
pub fn read_manifest(file: &Path) -> Result<Vec<Located<Object>>, ReadError> {
    let text = fs::read_to_string(file)
        .map_err(|error| ReadError::Unreadable(format!("{}: {error}", file.display())))?;
    parse_manifest(file, &text).map_err(ReadError::Invalid)
}
