//! Which addresses deliveries may reach (SSRF protection).
//!
//! The check runs on the addresses a host name resolves to, inside the HTTP client's resolver,
//! so the address that is checked is the address that is connected to: a DNS answer that
//! changes between a check and the connection (rebinding) cannot slip through. URLs with a
//! literal IP never reach a resolver and are checked before sending.
//!
//! Always refused unless allowed: link-local addresses (169.254.0.0/16, fe80::/10), where cloud
//! metadata services live, and AWS's IPv6 metadata address fd00:ec2::254. With
//! `[security] deny_private_networks = true`, loopback, private, shared (CGNAT), unspecified
//! and unique-local ranges are refused too. `allow_networks` overrides both.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use ipnet::IpNet;

use crate::config::SecurityConfig;

/// The rules in force.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    deny_private: bool,
    allow: Vec<IpNet>,
}

/// A refused address, with why; it travels up reqwest's error chain to the dead letter.
#[derive(Debug, thiserror::Error)]
#[error("refused to connect to {address}: {reason} (allow it with [security] allow_networks)")]
pub struct Refused {
    pub address: IpAddr,
    pub reason: &'static str,
}

impl EgressPolicy {
    pub fn new(security: &SecurityConfig) -> EgressPolicy {
        EgressPolicy {
            deny_private: security.deny_private_networks,
            allow: security.allow_networks.clone(),
        }
    }

    /// `Err` when deliveries may not reach `address`.
    pub fn check(&self, address: IpAddr) -> Result<(), Refused> {
        let address = canonical(address);
        if self.allow.iter().any(|net| net.contains(&address)) {
            return Ok(());
        }
        let reason = match classify(address) {
            Class::Metadata => Some("a link-local or cloud metadata address"),
            Class::Private(what) if self.deny_private => Some(what),
            _ => None,
        };
        match reason {
            Some(reason) => Err(Refused { address, reason }),
            None => Ok(()),
        }
    }
}

/// What kind of address it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Public,
    /// Loopback, private, shared or unique-local: refused with `deny_private_networks`.
    Private(&'static str),
    /// Link-local and cloud metadata: always refused unless allowed.
    Metadata,
}

/// Classifies an address (pure: no connection is made).
pub fn classify(address: IpAddr) -> Class {
    match canonical(address) {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Class {
    let [a, b, ..] = ip.octets();
    if ip.is_link_local() {
        Class::Metadata
    } else if ip.is_loopback() {
        Class::Private("a loopback address")
    } else if ip.is_private() {
        Class::Private("a private address")
    } else if a == 100 && (64..128).contains(&b) {
        Class::Private("a shared (carrier-grade NAT) address")
    } else if a == 0 || ip.is_broadcast() {
        Class::Private("an unspecified or broadcast address")
    } else {
        Class::Public
    }
}

fn classify_v6(ip: Ipv6Addr) -> Class {
    let first = ip.segments()[0];
    const AWS_METADATA: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
    if ip == AWS_METADATA || (first & 0xffc0) == 0xfe80 {
        Class::Metadata
    } else if ip.is_loopback() {
        Class::Private("a loopback address")
    } else if ip.is_unspecified() {
        Class::Private("an unspecified address")
    } else if (first & 0xfe00) == 0xfc00 {
        Class::Private("a unique-local address")
    } else {
        Class::Public
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) are judged as the IPv4 address they are.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// A resolver that resolves with the system's and drops refused addresses, failing with
/// [`Refused`] when none is left.
pub struct GuardedResolver {
    pub policy: Arc<EgressPolicy>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::task::spawn_blocking(move || (host.as_str(), 0).to_socket_addrs())
                    .await
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?
                    .collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|addr| match policy.check(addr.ip()) {
                    Ok(()) => true,
                    Err(why) => {
                        refused = Some(why);
                        false
                    }
                })
                .collect();
            match (allowed.is_empty(), refused) {
                (true, Some(why)) => Err(Box::new(why) as Box<dyn std::error::Error + Send + Sync>),
                _ => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

/// The [`Refused`] somewhere in an error's chain, if that is why it failed.
pub fn refused_in<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refused> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(refused) = error.downcast_ref::<Refused>() {
            return Some(refused);
        }
        current = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn addresses_are_classified_without_connecting() {
        assert_eq!(classify(ip("169.254.169.254")), Class::Metadata);
        assert_eq!(classify(ip("fd00:ec2::254")), Class::Metadata);
        assert_eq!(classify(ip("fe80::1")), Class::Metadata);
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(
                matches!(classify(ip(private)), Class::Private(_)),
                "{private}"
            );
        }
        for public in ["8.8.8.8", "172.32.0.1", "100.128.0.1", "2001:4860::8888"] {
            assert_eq!(classify(ip(public)), Class::Public, "{public}");
        }
    }

    #[test]
    fn the_policy_refuses_metadata_always_and_private_on_request() {
        let open = EgressPolicy::new(&SecurityConfig::default());
        assert!(
            open.check(ip("127.0.0.1")).is_ok(),
            "local setups work by default"
        );
        assert!(open.check(ip("169.254.169.254")).is_err());
        assert!(
            open.check(ip("::ffff:169.254.169.254")).is_err(),
            "mapped v6 too"
        );
        let strict = EgressPolicy::new(&SecurityConfig {
            deny_private_networks: true,
            allow_networks: vec![
                "10.9.0.0/16".parse().unwrap(),
                "169.254.169.254/32".parse().unwrap(),
            ],
            ..SecurityConfig::default()
        });
        let refused = strict.check(ip("192.168.0.10")).unwrap_err();
        assert_eq!(refused.reason, "a private address");
        assert!(refused.to_string().contains("192.168.0.10"));
        assert!(strict.check(ip("10.9.3.4")).is_ok(), "allowed explicitly");
        assert!(
            strict.check(ip("169.254.169.254")).is_ok(),
            "allowed explicitly"
        );
        assert!(strict.check(ip("10.8.0.1")).is_err());
        assert!(strict.check(ip("8.8.8.8")).is_ok());
    }
}
