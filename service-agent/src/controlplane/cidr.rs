//! The service CIDR (`--service-cidr`), the range cluster IPs live in.

use std::{error::Error, fmt, net::Ipv4Addr, str::FromStr};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix_len: u8,
}

impl Ipv4Cidr {
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask())
    }

    pub fn contains(&self, address: Ipv4Addr) -> bool {
        u32::from(address) & self.mask() == u32::from(self.network)
    }

    /// Whether a Service may hold `address` as its cluster IP: inside the range, and neither the
    /// network nor the broadcast address, which Kubernetes never hands out either.
    pub fn is_assignable(&self, address: Ipv4Addr) -> bool {
        self.contains(address) && address != self.network && address != self.broadcast()
    }

    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidCidr(String);

impl fmt::Display for InvalidCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Error for InvalidCidr {}

impl FromStr for Ipv4Cidr {
    type Err = InvalidCidr;

    fn from_str(text: &str) -> Result<Self, InvalidCidr> {
        let invalid = |reason: String| InvalidCidr(format!("invalid IPv4 CIDR {text:?}: {reason}"));
        let (address, prefix_len) = text
            .split_once('/')
            .ok_or_else(|| invalid("expected ADDRESS/PREFIX, e.g. 10.96.0.0/12".into()))?;
        let address: Ipv4Addr = address
            .parse()
            .map_err(|_| invalid(format!("{address:?} is not an IPv4 address")))?;
        let prefix_len = prefix_len
            .parse::<u8>()
            .ok()
            .filter(|len| *len <= 32)
            .ok_or_else(|| invalid(format!("prefix length {prefix_len:?} is not 0-32")))?;
        let cidr = Ipv4Cidr {
            network: address,
            prefix_len,
        };
        let network = Ipv4Addr::from(u32::from(address) & cidr.mask());
        if network != address {
            return Err(invalid(format!(
                "host bits are set; did you mean {network}/{prefix_len}?"
            )));
        }
        Ok(cidr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays() {
        let cidr: Ipv4Cidr = "10.96.0.0/12".parse().unwrap();
        assert_eq!(cidr.to_string(), "10.96.0.0/12");
        assert_eq!(cidr.network(), Ipv4Addr::new(10, 96, 0, 0));
        assert_eq!(cidr.broadcast(), Ipv4Addr::new(10, 111, 255, 255));
        assert!(cidr.contains(Ipv4Addr::new(10, 100, 3, 4)));
        assert!(!cidr.contains(Ipv4Addr::new(10, 112, 0, 1)));
        assert!(!cidr.is_assignable(cidr.broadcast()));
        assert!(!cidr.is_assignable(cidr.network()));
        assert!(cidr.is_assignable(Ipv4Addr::new(10, 96, 0, 1)));
    }

    #[test]
    fn whole_space_and_single_address() {
        let all: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(203, 0, 113, 9)));
        let one: Ipv4Cidr = "192.0.2.7/32".parse().unwrap();
        assert!(one.contains(Ipv4Addr::new(192, 0, 2, 7)));
        assert!(!one.contains(Ipv4Addr::new(192, 0, 2, 8)));
    }

    #[test]
    fn rejects_bad_input_with_a_hint() {
        let error = "10.96.0.1/12".parse::<Ipv4Cidr>().unwrap_err();
        assert!(
            error.to_string().contains("did you mean 10.96.0.0/12"),
            "{error}"
        );
        assert!("10.96.0.0".parse::<Ipv4Cidr>().is_err());
        assert!("10.96.0.0/33".parse::<Ipv4Cidr>().is_err());
        assert!("fd00::/108".parse::<Ipv4Cidr>().is_err());
    }
}
