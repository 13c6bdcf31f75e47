//! `--service-node-port-range`: where nodePorts come from, and what an explicit one must be in.

use std::{fmt, str::FromStr};

/// An inclusive range of ports, written `30000-32767` as kube-apiserver's flag is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// Kubernetes' default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: PortRange = PortRange {
    first: 30000,
    last: 32767,
};

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (first, last) = text
            .split_once('-')
            .ok_or_else(|| format!("{text:?} is not a range like 30000-32767"))?;
        let first: u16 = first.parse().map_err(|e| format!("{first:?}: {e}"))?;
        let last: u16 = last.parse().map_err(|e| format!("{last:?}: {e}"))?;
        if first == 0 || first > last {
            return Err(format!(
                "{text:?}: the range must be ascending and start above 0"
            ));
        }
        Ok(PortRange { first, last })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let range: PortRange = "30000-32767".parse().unwrap();
        assert_eq!(range, DEFAULT_NODE_PORT_RANGE);
        assert_eq!(range.to_string(), "30000-32767");
        assert!(range.contains(30000) && range.contains(32767) && !range.contains(29999));
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("20-10".parse::<PortRange>().is_err());
        assert!("30000".parse::<PortRange>().is_err());
    }
}
