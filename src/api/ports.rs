//! Published ports (`vps create -p 8081:8081 -p 8082:8082/udp`): an
//! instance's port reached from outside through the host, the cluster's
//! front door. The host gives each one an external port of its own range
//! and relays it to a node port the instance's node DNATs to the instance.
//! The names follow Vast.ai's: `VAST_TCP_PORT_<n>` in the instance holds the
//! external port of its port `n`.

use serde::{Deserialize, Serialize};

pub use super::forward::Proto;

/// The most ports one instance may publish (Vast.ai's limit).
pub const MAX_PUBLISHED: usize = 64;

/// Requests from this number up are identity ports: the instance gets an
/// external port and listens on that same number inside.
pub const IDENTITY_FROM: u32 = 70000;

/// The port Jupyter listens on in `--launch jupyter` (Vast.ai's).
pub const JUPYTER_PORT: u32 = 8080;

/// One `-p` as the user wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortRequest {
    /// The instance's port (1-65535), or an identity request (70000 and up).
    pub port: u32,
    pub proto: Proto,
}

impl PortRequest {
    /// `8081`, `8081:8081`, `8082/udp`, `70000:70000/tcp`. Both sides of a
    /// `:` must agree: the external port is the host's to choose.
    pub fn parse(text: &str) -> Result<PortRequest, String> {
        let (ports, proto) = match text.rsplit_once('/') {
            Some((p, "tcp")) => (p, Proto::Tcp),
            Some((p, "udp")) => (p, Proto::Udp),
            Some((_, other)) => {
                return Err(format!(
                    "{text:?}: {other:?} is no protocol; write /tcp or /udp"
                ))
            }
            None => (text, Proto::Tcp),
        };
        let number = |s: &str| {
            s.parse::<u32>()
                .map_err(|_| format!("{text:?}: {s:?} is not a port number"))
        };
        let port = match ports.split_once(':') {
            Some((outside, inside)) => {
                let (o, i) = (number(outside)?, number(inside)?);
                if o != i {
                    return Err(format!(
                        "{text:?}: the host picks the external port; write -p {i}{} (the port inside)",
                        if proto == Proto::Udp { "/udp" } else { "" }
                    ));
                }
                i
            }
            None => number(ports)?,
        };
        let r = PortRequest { port, proto };
        r.check().map(|()| r)
    }

    /// A refusal, or nothing.
    pub fn check(&self) -> Result<(), String> {
        if self.port == 0 || (self.port > 65535 && self.port < IDENTITY_FROM) {
            return Err(format!(
                "port {}: give the instance's port (1-65535), or {IDENTITY_FROM} and up for an identity port",
                self.port
            ));
        }
        Ok(())
    }

    pub fn is_identity(&self) -> bool {
        self.port >= IDENTITY_FROM
    }
}

impl std::fmt::Display for PortRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.proto)
    }
}

/// A published port as placed: which request, where inside, the node port
/// the node DNATs to it, the host's external port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Published {
    pub request: u32,
    pub proto: Proto,
    /// The port inside the instance (for an identity request, `external`).
    pub internal: u16,
    pub node_port: u16,
    pub external: u16,
}

impl Published {
    /// The variable that names it inside, as Vast.ai does.
    pub fn variable(&self) -> String {
        let p = match self.proto {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        };
        format!("VAST_{p}_PORT_{}", self.request)
    }
}

/// The requests of one instance, refused as a whole with the reason.
pub fn check_requests(requests: &[PortRequest]) -> Result<(), String> {
    if requests.len() > MAX_PUBLISHED {
        return Err(format!(
            "ports: {} ports asked for; an instance publishes at most {MAX_PUBLISHED}",
            requests.len()
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for r in requests {
        r.check().map_err(|e| format!("ports: {e}"))?;
        if !seen.insert((r.port, r.proto == Proto::Udp)) {
            return Err(format!("ports: {r} is asked for twice"));
        }
    }
    Ok(())
}

/// `PUT /api/nodes/{node}/tasks/{id}/expose`: the image's `EXPOSE`d ports,
/// found by the runner once it has the image; the host publishes those the
/// instance lacks and answers with its placement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExposeRequest {
    #[serde(default)]
    pub ports: Vec<PortRequest>,
}

/// The requests of `exposed` an instance asking for `asked` still lacks,
/// as many as the limit leaves room for, and how many were left out.
pub fn still_unpublished(
    asked: &[PortRequest],
    exposed: &[PortRequest],
) -> (Vec<PortRequest>, usize) {
    let mut new: Vec<PortRequest> = Vec::new();
    for r in exposed {
        if !asked.contains(r) && !new.contains(r) {
            new.push(*r);
        }
    }
    let room = MAX_PUBLISHED.saturating_sub(asked.len());
    let left_out = new.len().saturating_sub(room);
    new.truncate(room);
    (new, left_out)
}

/// A range of ports, `20000-29999`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn parse(text: &str) -> Result<PortRange, String> {
        let (a, b) = text.split_once('-').ok_or_else(|| {
            format!("{text:?} is not a range; write FIRST-LAST, e.g. 20000-29999")
        })?;
        let n = |s: &str| {
            s.trim()
                .parse::<u16>()
                .map_err(|_| format!("{text:?}: {s:?} is not a port number"))
        };
        let (first, last) = (n(a)?, n(b)?);
        if first == 0 || first > last {
            return Err(format!("{text:?}: the range is empty or starts at 0"));
        }
        Ok(PortRange { first, last })
    }

    pub fn contains(&self, p: u16) -> bool {
        (self.first..=self.last).contains(&p)
    }

    pub fn overlaps(&self, first: u16, last: u16) -> bool {
        self.first <= last && first <= self.last
    }
}

/// Why `range` cannot be the published ports, given the kernel's
/// `ip_local_port_range` text (`32768\t60999`): outgoing connections (the
/// front door's own UDP relays among them) take their ports from there.
pub fn ephemeral_clash(range: PortRange, ip_local_port_range: &str) -> Option<String> {
    let mut it = ip_local_port_range
        .split_whitespace()
        .filter_map(|n| n.parse::<u16>().ok());
    let (first, last) = (it.next()?, it.next()?);
    range.overlaps(first, last).then(|| {
        format!(
            "published_ports {range} meets the kernel's ephemeral ports ({first}-{last}, net.ipv4.ip_local_port_range): pick a range outside them"
        )
    })
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_vast_writes_them() {
        let p = |s| PortRequest::parse(s);
        assert_eq!(
            p("8081:8081").unwrap(),
            PortRequest {
                port: 8081,
                proto: Proto::Tcp
            }
        );
        assert_eq!(
            p("8082:8082/udp").unwrap(),
            PortRequest {
                port: 8082,
                proto: Proto::Udp
            }
        );
        assert_eq!(p("9000").unwrap().port, 9000);
        assert!(p("70000:70000").unwrap().is_identity());
        assert!(p("8080:80").unwrap_err().contains("-p 80"));
        assert!(p("8082/sctp").unwrap_err().contains("/udp"));
        assert!(p("0").unwrap_err().contains("1-65535"));
        assert!(p("65536").unwrap_err().contains("70000"));
        assert!(p("x").unwrap_err().contains("not a port"));
    }

    #[test]
    fn the_sixty_fifth_port_and_a_repeat_are_refused() {
        let many: Vec<PortRequest> = (1..=65)
            .map(|port| PortRequest {
                port,
                proto: Proto::Tcp,
            })
            .collect();
        assert!(check_requests(&many[..64]).is_ok());
        assert!(check_requests(&many).unwrap_err().contains("at most 64"));
        let tcp = PortRequest {
            port: 53,
            proto: Proto::Tcp,
        };
        let udp = PortRequest {
            proto: Proto::Udp,
            ..tcp
        };
        assert!(check_requests(&[tcp, udp]).is_ok());
        assert!(check_requests(&[tcp, tcp]).unwrap_err().contains("twice"));
    }

    #[test]
    fn variables_are_named_by_the_request() {
        let p = Published {
            request: 70000,
            proto: Proto::Tcp,
            internal: 20001,
            node_port: 30001,
            external: 20001,
        };
        assert_eq!(p.variable(), "VAST_TCP_PORT_70000");
        let u = Published {
            request: 8082,
            proto: Proto::Udp,
            ..p
        };
        assert_eq!(u.variable(), "VAST_UDP_PORT_8082");
    }

    #[test]
    fn exposed_ports_add_what_was_not_asked_for_up_to_the_limit() {
        let r = |s: &str| PortRequest::parse(s).unwrap();
        let (new, left) =
            still_unpublished(&[r("8080")], &[r("8080/tcp"), r("53/udp"), r("53/udp")]);
        assert_eq!((new, left), (vec![r("53/udp")], 0));
        let full: Vec<PortRequest> = (1..=63).map(|p| r(&p.to_string())).collect();
        let (new, left) = still_unpublished(&full, &[r("9000"), r("9001")]);
        assert_eq!((new, left), (vec![r("9000")], 1));
    }

    #[test]
    fn ranges() {
        let r = PortRange::parse("20000-29999").unwrap();
        assert!(r.contains(20000) && r.contains(29999) && !r.contains(30000));
        assert!(r.overlaps(29999, 40000) && !r.overlaps(30000, 32767));
        assert!(PortRange::parse("3-2").is_err());
        assert!(ephemeral_clash(r, "32768\t60999\n").is_none());
        let clash = ephemeral_clash(PortRange::parse("30000-40000").unwrap(), "32768\t60999");
        assert!(clash.unwrap().contains("32768-60999"));
        assert!(PortRange::parse("20000").is_err());
    }
}
