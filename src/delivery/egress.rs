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
//! and unique-local ranges are refused too. `allow_networks` overrides both. An IPv6 address
//! that carries an IPv4 one (mapped `::ffff:a.b.c.d`, compatible `::a.b.c.d`, NAT64
//! `64:ff9b::/96` and `64:ff9b:1::/48`, 6to4 `2002::/16`, Teredo `2001::/32`) is judged as the
//! IPv4 address it reaches.

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

impl EgressPolicy {
    /// The allowed ones among resolved addresses; `Err` with a refusal when all were refused.
    fn keep_allowed<T>(
        &self,
        resolved: Vec<T>,
        ip: impl Fn(&T) -> IpAddr,
    ) -> Result<Vec<T>, Refused> {
        let mut refused = None;
        let allowed: Vec<T> = resolved
            .into_iter()
            .filter(|address| match self.check(ip(address)) {
                Ok(()) => true,
                Err(why) => {
                    refused = Some(why);
                    false
                }
            })
            .collect();
        match refused {
            Some(why) if allowed.is_empty() => Err(why),
            _ => Ok(allowed),
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

/// IPv6 forms that carry an IPv4 address are judged as that address: a blocked IPv4 address
/// stays blocked however it is spelled.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The IPv4 address an IPv6 one reaches, for the forms that embed one.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = Ipv4Addr::from(u128::from(ip) as u32);
    if let Some(mapped) = ip.to_ipv4_mapped() {
        return Some(mapped);
    }
    match s {
        // IPv4-compatible (deprecated, still routed by some stacks); not `::` and `::1`.
        [0, 0, 0, 0, 0, 0, hi, _] if hi != 0 => Some(low),
        // NAT64, well-known prefix (RFC 6052) and local-use prefix (RFC 8215).
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] | [0x64, 0xff9b, 1, ..] => Some(low),
        // 6to4 (RFC 3056): 2002:AABB:CCDD::/48 reaches AA.BB.CC.DD.
        [0x2002, a, b, ..] => Some(Ipv4Addr::from((u32::from(a) << 16) | u32::from(b))),
        // Teredo (RFC 4380): the client's address, inverted, in the last 32 bits.
        [0x2001, 0, ..] => Some(Ipv4Addr::from(!(u128::from(ip) as u32))),
        _ => None,
    }
}

/// Resolves `host` (a name or a literal address) and keeps the addresses the policy allows;
/// `Err` when none is left, saying why (for kinds that connect by themselves, such as
/// `postgres`).
pub async fn resolve_allowed(
    policy: &EgressPolicy,
    host: &str,
    port: u16,
) -> Result<Vec<IpAddr>, String> {
    let name = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let resolved: Vec<IpAddr> = match name.parse::<IpAddr>() {
        Ok(literal) => vec![literal],
        Err(_) => tokio::task::spawn_blocking(move || (name.as_str(), port).to_socket_addrs())
            .await
            .map_err(|e| format!("resolving {host} failed: {e}"))?
            .map_err(|e| format!("resolving {host} failed: {e}"))?
            .map(|addr| addr.ip())
            .collect(),
    };
    match policy.keep_allowed(resolved, |address| *address) {
        Ok(allowed) if allowed.is_empty() => Err(format!("{host} resolves to no address")),
        Ok(allowed) => Ok(allowed),
        Err(why) => Err(why.to_string()),
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
            match policy.keep_allowed(resolved, SocketAddr::ip) {
                Ok(allowed) => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
                Err(why) => Err(Box::new(why) as Box<dyn std::error::Error + Send + Sync>),
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
    fn ipv6_forms_of_blocked_ipv4_addresses_are_blocked() {
        for metadata in [
            "::ffff:169.254.169.254",
            "::ffff:a9fe:a9fe",
            "::169.254.169.254",
            "64:ff9b::169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::a9fe:a9fe",
            "2002:a9fe:a9fe::",
            "2002:a9fe:a9fe:1::1",
            // Teredo: client 169.254.169.254 inverted is 5601:5601.
            "2001:0:4136:e378:8000:63bf:5601:5601",
        ] {
            assert_eq!(classify(ip(metadata)), Class::Metadata, "{metadata}");
        }
        for private in [
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::10.0.0.1",
            "64:ff9b:1::c0a8:101",
            "2002:7f00:1::",
            "2002:c0a8:0101::1",
            "2002:0a00:0001::",
            "2002:6440:0001::",
            "2001:0:4136:e378:8000:63bf:80ff:fffe",
        ] {
            assert!(
                matches!(classify(ip(private)), Class::Private(_)),
                "{private}: {:?}",
                classify(ip(private))
            );
        }
        for public in ["64:ff9b::8.8.8.8", "2002:0808:0808::", "::ffff:8.8.8.8"] {
            assert_eq!(classify(ip(public)), Class::Public, "{public}");
        }
        assert!(matches!(classify(ip("::")), Class::Private(_)));
        assert!(matches!(classify(ip("::1")), Class::Private(_)));
        let strict = EgressPolicy::new(&SecurityConfig {
            deny_private_networks: true,
            ..SecurityConfig::default()
        });
        assert!(strict.check(ip("64:ff9b::7f00:1")).is_err());
        assert!(strict.check(ip("2002:7f00:1::")).is_err());
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
