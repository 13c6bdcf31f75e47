//! Which links get which TC program: every link whose name matches one of the globs, now or
//! later (pods come and go, and so do their host-side veths; an external link may be renamed or
//! re-created). `--pod-interface` globs get `pod_ingress`, `--external-interface` ones
//! `external_ingress`. The attachments are pinned links: they outlive the agent, and the next
//! agent adopts them.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CStr,
    os::fd::AsFd as _,
};

use anyhow::{Context as _, Result};
use aya::programs::{SchedClassifier, TcAttachType, links::FdLink};

use crate::dataplane::{
    LinkPins,
    links::{BPF_LINK_TYPE_TCX, pin_name},
};

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

/// Takes out of `attached` (name -> index) the links that are no longer `wanted`, or were
/// re-created with another index, and returns them.
pub fn take_vanished(
    attached: &mut BTreeMap<String, u32>,
    wanted: &BTreeMap<String, u32>,
) -> Vec<(String, u32)> {
    let gone: Vec<String> = attached
        .iter()
        .filter(|(name, index)| wanted.get(*name) != Some(index))
        .map(|(name, _)| name.clone())
        .collect();
    gone.into_iter()
        .filter_map(|name| attached.remove(&name).map(|link| (name, link)))
        .collect()
}

/// Keeps one program attached to exactly the matching links, each attachment a pinned TCX link
/// (`<program>@<interface>`), so that it outlives the agent.
pub struct LinkAttachments {
    /// The program's name, for messages and pin names.
    program: &'static str,
    globs: Vec<String>,
    /// name -> ifindex of the links attached or adopted. The index tells a re-created link from
    /// the one attached.
    attached: BTreeMap<String, u32>,
    /// Whether the pins of links that no longer match (or vanished while no agent ran) were
    /// removed: done once, at the first reconcile.
    swept: bool,
}

impl LinkAttachments {
    pub fn new(program: &'static str, globs: Vec<String>) -> Self {
        Self {
            program,
            globs,
            attached: BTreeMap::new(),
            swept: false,
        }
    }

    pub fn program(&self) -> &'static str {
        self.program
    }

    fn pin_name(&self, interface: &str) -> String {
        pin_name(self.program, interface)
    }

    /// Attaches to new matching links (adopting the pinned link of a previous agent there),
    /// runs `set_up` for each (the link's sysctls), and removes the attachments of vanished
    /// ones. A link that fails is left for the next call, and the others go on: the errors are
    /// returned, one per link.
    pub fn reconcile(
        &mut self,
        program: &mut SchedClassifier,
        pins: &LinkPins,
        mut set_up: impl FnMut(&str) -> Result<()>,
    ) -> Vec<anyhow::Error> {
        let mut errors = Vec::new();
        let wanted = match matching_links(&self.globs) {
            Ok(wanted) => wanted,
            Err(err) => return vec![err],
        };
        if !self.swept {
            let wanted_pins: BTreeSet<String> =
                wanted.keys().map(|name| self.pin_name(name)).collect();
            match pins.remove_unwanted(&self.pin_name(""), |name| wanted_pins.contains(name)) {
                Ok(()) => self.swept = true,
                Err(err) => errors.push(err),
            }
        }
        for (name, _) in take_vanished(&mut self.attached, &wanted) {
            // The kernel detached it with its device; the pin still holds the link object.
            match pins.remove(&self.pin_name(&name)) {
                Ok(()) => tracing::info!(
                    interface = %name, program = self.program, "link gone, program detached"
                ),
                Err(err) => errors.push(err),
            }
        }
        let program_fd = match program.fd().and_then(|fd| Ok(fd.try_clone()?)) {
            Ok(fd) => fd,
            Err(err) => {
                errors.push(err.into());
                return errors;
            }
        };
        for (name, index) in wanted {
            if self.attached.contains_key(&name) {
                continue;
            }
            let attached = pins
                .ensure(
                    &self.pin_name(&name),
                    BPF_LINK_TYPE_TCX,
                    u64::from(index),
                    program_fd.as_fd(),
                    || {
                        // By name (aya 0.14 has no TC attach by index): a link re-created under
                        // the same name since it was listed is caught by the next call, which
                        // sees its new index.
                        let link = program.attach(&name, TcAttachType::Ingress)?;
                        Ok(FdLink::try_from(program.take_link(link)?)?)
                    },
                )
                .and_then(|how| set_up(&name).map(|()| how))
                .with_context(|| format!("attaching {} to {name}", self.program));
            match attached {
                Ok(how) => {
                    tracing::info!(interface = %name, program = self.program, how = ?how, "attached");
                    self.attached.insert(name, index);
                }
                Err(err) => errors.push(err),
            }
        }
        errors
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
