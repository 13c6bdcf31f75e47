//! The XDP fast path on external links (`--xdp-mode`): `external_xdp` is attached next to the
//! TC program `external_ingress` on every link the `--external-interface` globs match, and each
//! such link is made a redirect target of the others (the `XDP_EGRESS` device map), so that a
//! packet translated in XDP can leave through any of them without entering the stack.
//!
//! TC stays attached whatever the mode: it finishes what XDP passes on (see the kernel side),
//! and it is the whole path when XDP is off or a link's driver refuses it.

use std::collections::BTreeMap;

use anyhow::Result;
use aya::{
    maps::{DevMapHash, MapData},
    programs::{Xdp, XdpMode as AttachMode, xdp::XdpLinkId},
};
use clap::ValueEnum;

use crate::interfaces::{matching_links, take_vanished};

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

/// Keeps `external_xdp` attached to exactly the matching links, and `XDP_EGRESS` listing them.
pub struct XdpAttachments {
    mode: XdpMode,
    globs: Vec<String>,
    /// name -> (ifindex, attachment), as for the TC attachments.
    attached: BTreeMap<String, (u32, XdpLinkId)>,
    /// Links whose driver refused the mode: warned about once, then left to TC.
    refused: BTreeMap<String, u32>,
}

impl XdpAttachments {
    pub fn new(mode: XdpMode, globs: Vec<String>) -> Self {
        Self {
            mode,
            globs,
            attached: BTreeMap::new(),
            refused: BTreeMap::new(),
        }
    }

    /// Attaches to new matching links and forgets vanished ones.
    pub fn reconcile(&mut self, program: &mut Xdp, egress: &mut DevMapHash<MapData>) -> Result<()> {
        let attach_mode = match self.mode {
            XdpMode::Native => AttachMode::Driver,
            XdpMode::Generic => AttachMode::Skb,
            XdpMode::Off => return Ok(()),
        };
        let wanted = matching_links(&self.globs)?;
        for (name, (index, link)) in take_vanished(&mut self.attached, &wanted) {
            // Both fail when the link went with its device, which took them along.
            let _ = egress.remove(index);
            let _ = program.detach(link);
            tracing::info!(interface = %name, "link gone, XDP detached");
        }
        self.refused
            .retain(|name, index| wanted.get(name) == Some(index));
        for (name, index) in wanted {
            if self.attached.contains_key(&name) || self.refused.contains_key(&name) {
                continue;
            }
            let link = match program.attach_to_if_index(index, attach_mode) {
                Ok(link) => link,
                Err(err) => {
                    tracing::warn!(
                        interface = %name,
                        mode = ?self.mode,
                        "XDP refused ({err}); TC alone serves this link"
                    );
                    self.refused.insert(name, index);
                    continue;
                }
            };
            tracing::info!(interface = %name, mode = ?self.mode, "XDP attached");
            // Without the entry, XDP still translates on this link but never sends out of it:
            // the stack forwards instead.
            if let Err(err) = egress.insert(index, index, None, 0) {
                tracing::error!(interface = %name, "adding the link to XDP_EGRESS: {err}");
            }
            self.attached.insert(name, (index, link));
        }
        Ok(())
    }

    pub fn detach_all(&mut self, program: &mut Xdp, egress: &mut DevMapHash<MapData>) {
        for (name, (index, link)) in std::mem::take(&mut self.attached) {
            let _ = egress.remove(index);
            if let Err(err) = program.detach(link) {
                tracing::debug!(interface = %name, %err, "XDP detach failed (link already gone?)");
            }
        }
    }
}
