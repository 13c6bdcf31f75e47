//! The XDP fast path on external links (`--xdp-mode`): `external_xdp` is attached next to the
//! TC program `external_ingress` on every link the `--external-interface` globs match, and each
//! such link is made a redirect target of the others (the `XDP_EGRESS` device map), so that a
//! packet translated in XDP can leave through any of them without entering the stack.
//!
//! TC stays attached whatever the mode: it finishes what XDP passes on (see the kernel side),
//! and it is the whole path when XDP is off or a link's driver refuses it.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::AsFd as _,
};

use anyhow::Result;
use aya::{
    maps::{DevMapHash, MapData},
    programs::{Xdp, XdpMode as AttachMode, links::FdLink},
};
use clap::ValueEnum;

use crate::{
    dataplane::{
        EXTERNAL_XDP_PROGRAM, LinkPins,
        links::{BPF_LINK_TYPE_XDP, pin_name},
    },
    interfaces::{matching_links, take_vanished},
};

/// How `external_xdp` is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum XdpMode {
    /// In the driver, before any skb exists (veth, and most physical NICs, support it).
    Native,
    /// In the stack after the skb is built: works on any link, gains less.
    Generic,
    /// No XDP: TC does everything.
    Off,
}

/// Keeps `external_xdp` attached to exactly the matching links, each attachment a pinned XDP
/// link (`external_xdp-<mode>@<interface>`), and `XDP_EGRESS` listing them.
pub struct XdpAttachments {
    mode: XdpMode,
    globs: Vec<String>,
    /// name -> ifindex of the links attached or adopted, as for the TC attachments.
    attached: BTreeMap<String, u32>,
    /// Links whose driver refused the mode: warned about once, then left to TC.
    refused: BTreeMap<String, u32>,
    /// Whether pins of links no longer served (or of another mode) were removed.
    swept: bool,
}

impl XdpAttachments {
    pub fn new(mode: XdpMode, globs: Vec<String>) -> Self {
        Self {
            mode,
            globs,
            attached: BTreeMap::new(),
            refused: BTreeMap::new(),
            swept: false,
        }
    }

    /// The pin name of this mode's attachment to `interface`.
    fn pin_name(&self, interface: &str) -> String {
        let mode = match self.mode {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
            XdpMode::Off => "off",
        };
        pin_name(&format!("{EXTERNAL_XDP_PROGRAM}-{mode}"), interface)
    }

    /// Attaches to new matching links (adopting a previous agent's pinned link there when it
    /// runs in the same mode) and removes the attachments of vanished ones.
    pub fn reconcile(
        &mut self,
        program: &mut Xdp,
        egress: &mut DevMapHash<MapData>,
        pins: &LinkPins,
    ) -> Result<()> {
        let wanted = match self.mode {
            XdpMode::Off => BTreeMap::new(),
            XdpMode::Native | XdpMode::Generic => matching_links(&self.globs)?,
        };
        if !self.swept {
            let wanted_pins: BTreeSet<String> =
                wanted.keys().map(|name| self.pin_name(name)).collect();
            pins.remove_unwanted(EXTERNAL_XDP_PROGRAM, |name| wanted_pins.contains(name))?;
            // Entries of links that are gone, or that another mode served.
            let listed: Vec<u32> = egress.keys().filter_map(Result::ok).collect();
            for index in listed {
                if !wanted.values().any(|wanted| *wanted == index) {
                    let _ = egress.remove(index);
                }
            }
            self.swept = true;
        }
        let attach_mode = match self.mode {
            XdpMode::Native => AttachMode::Driver,
            XdpMode::Generic => AttachMode::Skb,
            XdpMode::Off => return Ok(()),
        };
        for (name, index) in take_vanished(&mut self.attached, &wanted) {
            // Fails when the link went with its device, which took the entry along.
            let _ = egress.remove(index);
            pins.remove(&self.pin_name(&name))?;
            tracing::info!(interface = %name, "link gone, XDP detached");
        }
        self.refused
            .retain(|name, index| wanted.get(name) == Some(index));
        let program_fd = program.fd()?.try_clone()?;
        for (name, index) in wanted {
            if self.attached.contains_key(&name) || self.refused.contains_key(&name) {
                continue;
            }
            let attached = pins.ensure(
                &self.pin_name(&name),
                BPF_LINK_TYPE_XDP,
                u64::from(index),
                program_fd.as_fd(),
                || {
                    let link = program.attach_to_if_index(index, attach_mode)?;
                    Ok(FdLink::try_from(program.take_link(link)?)?)
                },
            );
            let how = match attached {
                Ok(how) => how,
                Err(err) => {
                    tracing::warn!(
                        interface = %name,
                        mode = ?self.mode,
                        "XDP refused ({err:#}); TC alone serves this link"
                    );
                    self.refused.insert(name, index);
                    continue;
                }
            };
            tracing::info!(interface = %name, mode = ?self.mode, how = ?how, "XDP attached");
            // Without the entry, XDP still translates on this link but never sends out of it:
            // the stack forwards instead.
            if let Err(err) = egress.insert(index, index, None, 0) {
                tracing::error!(interface = %name, "adding the link to XDP_EGRESS: {err}");
            }
            self.attached.insert(name, index);
        }
        Ok(())
    }
}
