//! Which links get which TC program: every link whose name matches one of the globs, now or
//! later (pods come and go, and so do their host-side veths; an external link may be renamed or
//! re-created). `--pod-interface` globs get `pod_ingress`, `--external-interface` ones
//! `external_ingress`.

use std::{collections::BTreeMap, ffi::CStr};

use anyhow::{Context as _, Result};
use aya::programs::{SchedClassifier, TcAttachType, tc::SchedClassifierLinkId};

/// Shell-style glob: `*` any run of characters, `?` one character.
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    fn matches(pattern: &[u8], name: &[u8]) -> bool {
        match (pattern.first(), name.first()) {
            (None, None) => true,
            (Some(b'*'), _) => {
                matches(&pattern[1..], name) || (!name.is_empty() && matches(pattern, &name[1..]))
            }
            (Some(b'?'), Some(_)) => matches(&pattern[1..], &name[1..]),
            (Some(p), Some(n)) if p == n => matches(&pattern[1..], &name[1..]),
            _ => false,
        }
    }
    matches(pattern.as_bytes(), name.as_bytes())
}

/// The links of the current network namespace, as (index, name).
pub fn list_links() -> Result<Vec<(u32, String)>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zeroed entry, freed below.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return Err(std::io::Error::last_os_error()).context("listing network interfaces");
        }
        let mut links = Vec::new();
        let mut entry = head;
        while (*entry).if_index != 0 {
            let name = CStr::from_ptr((*entry).if_name)
                .to_string_lossy()
                .into_owned();
            links.push(((*entry).if_index, name));
            entry = entry.add(1);
        }
        libc::if_freenameindex(head);
        Ok(links)
    }
}

/// The links whose name matches one of `globs`: name -> index.
pub fn matching_links(globs: &[String]) -> Result<BTreeMap<String, u32>> {
    Ok(list_links()?
        .into_iter()
        .filter(|(_, name)| globs.iter().any(|glob| glob_matches(glob, name)))
        .map(|(index, name)| (name, index))
        .collect())
}

/// Takes out of `attached` (name -> (index, attachment)) the links that are no longer `wanted`,
/// or were re-created with another index, and returns them.
pub fn take_vanished<T>(
    attached: &mut BTreeMap<String, (u32, T)>,
    wanted: &BTreeMap<String, u32>,
) -> Vec<(String, (u32, T))> {
    let gone: Vec<String> = attached
        .iter()
        .filter(|(name, (index, _))| wanted.get(*name) != Some(index))
        .map(|(name, _)| name.clone())
        .collect();
    gone.into_iter()
        .filter_map(|name| attached.remove(&name).map(|link| (name, link)))
        .collect()
}

/// Keeps one program attached to exactly the matching links.
pub struct LinkAttachments {
    /// The program's name, for messages.
    program: &'static str,
    globs: Vec<String>,
    /// name -> (ifindex, attachment). The index tells a re-created link from the one we attached.
    attached: BTreeMap<String, (u32, SchedClassifierLinkId)>,
}

impl LinkAttachments {
    pub fn new(program: &'static str, globs: Vec<String>) -> Self {
        Self {
            program,
            globs,
            attached: BTreeMap::new(),
        }
    }

    pub fn program(&self) -> &'static str {
        self.program
    }

    /// Attaches to new matching links and forgets vanished ones (the kernel already detached
    /// those with the link). Returns the names newly attached.
    pub fn reconcile(&mut self, program: &mut SchedClassifier) -> Result<Vec<String>> {
        let wanted = matching_links(&self.globs)?;
        for (name, (_, link)) in take_vanished(&mut self.attached, &wanted) {
            // Fails when the link went with its device; nothing is left to clean up then.
            let _ = program.detach(link);
            tracing::info!(interface = %name, program = self.program, "link gone, program detached");
        }
        let mut added = Vec::new();
        for (name, index) in wanted {
            if self.attached.contains_key(&name) {
                continue;
            }
            let link = program
                .attach(&name, TcAttachType::Ingress)
                .with_context(|| format!("attaching {} to {name}", self.program))?;
            tracing::info!(interface = %name, program = self.program, "attached");
            self.attached.insert(name.clone(), (index, link));
            added.push(name);
        }
        Ok(added)
    }

    pub fn detach_all(&mut self, program: &mut SchedClassifier) {
        for (name, (_, link)) in std::mem::take(&mut self.attached) {
            if let Err(err) = program.detach(link) {
                tracing::debug!(interface = %name, %err, "detach failed (link already gone?)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::glob_matches;

    #[test]
    fn globs() {
        assert!(glob_matches("lxc*", "lxc0"));
        assert!(glob_matches("lxc*", "lxc"));
        assert!(glob_matches("veth?", "veth1"));
        assert!(!glob_matches("veth?", "veth12"));
        assert!(glob_matches("*", "eth0"));
        assert!(!glob_matches("lxc*", "eth0"));
        assert!(glob_matches("cali*x", "cali123x"));
        assert!(!glob_matches("cali*x", "cali123y"));
    }
}
