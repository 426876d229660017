//! Instance addresses on the node's bridge subnet, persisted so a restarted
//! runner hands out the same address to the same instance and never the
//! same address twice.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

use super::NetError;

/// An IPv4 network such as `10.88.0.0/24` (the address must be the network's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }

    /// The bridge's own address: the first host of the network.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) + 1)
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }
}

impl FromStr for Ipv4Net {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a network: write it as 10.88.0.0/24"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{s:?}: {a:?} is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .map_err(|_| format!("{s:?}: {p:?} is not a prefix length"))?;
        if !(8..=30).contains(&prefix) {
            return Err(format!("{s:?}: the prefix must be 8 to 30"));
        }
        let net = Self { addr, prefix };
        if u32::from(addr) & net.mask() != u32::from(addr) {
            return Err(format!(
                "{s:?}: host bits are set; the network is {}/{prefix}",
                Ipv4Addr::from(u32::from(addr) & net.mask())
            ));
        }
        Ok(net)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Address leases of one subnet, in a JSON file.
pub struct Ipam {
    file: PathBuf,
    net: Ipv4Net,
    lock: Mutex<()>,
}

impl Ipam {
    pub fn new(file: &Path, net: Ipv4Net) -> Self {
        Self {
            file: file.to_path_buf(),
            net,
            lock: Mutex::new(()),
        }
    }

    pub fn net(&self) -> Ipv4Net {
        self.net
    }

    pub fn leases(&self) -> Result<BTreeMap<String, Ipv4Addr>, NetError> {
        read_map(&self.file)
    }

    fn save(&self, leases: &BTreeMap<String, Ipv4Addr>) -> Result<(), NetError> {
        write_map(&self.file, leases)
    }

    /// The address of `owner`, allocating the lowest free one the first time.
    pub fn allocate(&self, owner: &str) -> Result<Ipv4Addr, NetError> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut leases = self.leases()?;
        if let Some(ip) = leases.get(owner) {
            return Ok(*ip);
        }
        let first = u32::from(self.net.gateway()) + 1;
        let last = u32::from(self.net.broadcast()) - 1;
        let taken: std::collections::BTreeSet<Ipv4Addr> = leases.values().copied().collect();
        let ip = (first..=last)
            .map(Ipv4Addr::from)
            .find(|ip| !taken.contains(ip))
            .ok_or(NetError::Exhausted(self.net))?;
        leases.insert(owner.to_string(), ip);
        self.save(&leases)?;
        Ok(ip)
    }

    /// Gives `owner`'s address back; `None` if it had none.
    pub fn release(&self, owner: &str) -> Result<Option<Ipv4Addr>, NetError> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut leases = self.leases()?;
        let ip = leases.remove(owner);
        if ip.is_some() {
            self.save(&leases)?;
        }
        Ok(ip)
    }
}

/// A map kept as a JSON file by instance (leases, overlay groups): empty
/// while the file does not exist.
pub(super) fn read_map<V: serde::de::DeserializeOwned>(
    file: &Path,
) -> Result<BTreeMap<String, V>, NetError> {
    let err = |message: String| NetError::State {
        path: file.to_path_buf(),
        message,
    };
    match std::fs::read_to_string(file) {
        Ok(t) => serde_json::from_str(&t).map_err(|e| err(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(err(e.to_string())),
    }
}

/// Writes `map` whole to `file` (atomically), making its directory.
pub(super) fn write_map<V: serde::Serialize>(
    file: &Path,
    map: &BTreeMap<String, V>,
) -> Result<(), NetError> {
    let err = |message: String| NetError::State {
        path: file.to_path_buf(),
        message,
    };
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    }
    let json = serde_json::to_vec_pretty(map).map_err(|e| err(e.to_string()))?;
    crate::files::write_public(file, &json).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_parse_strictly() {
        let n: Ipv4Net = "10.88.0.0/24".parse().unwrap();
        assert_eq!(
            (n.gateway(), n.broadcast()),
            ("10.88.0.1".parse().unwrap(), "10.88.0.255".parse().unwrap())
        );
        assert!(
            n.contains("10.88.0.77".parse().unwrap()) && !n.contains("10.88.1.1".parse().unwrap())
        );
        assert_eq!(n.to_string(), "10.88.0.0/24");
        for bad in [
            "10.88.0.0",
            "10.88.0.1/24",
            "10.88.0.0/31",
            "x/24",
            "10.88.0.0/abc",
            "300.0.0.0/8",
        ] {
            assert!(bad.parse::<Ipv4Net>().is_err(), "{bad}");
        }
    }

    #[test]
    fn leases_are_stable_unique_and_persisted() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("ipam.json");
        let net: Ipv4Net = "10.88.0.0/29".parse().unwrap(); // hosts .2 to .6 for instances
        let ipam = Ipam::new(&f, net);
        let a = ipam.allocate("vps-1").unwrap();
        assert_eq!(a, "10.88.0.2".parse::<Ipv4Addr>().unwrap());
        assert_eq!(
            ipam.allocate("vps-1").unwrap(),
            a,
            "same owner, same address"
        );
        let b = ipam.allocate("vps-2").unwrap();
        assert_ne!(a, b);
        // A restarted runner reads the same leases.
        let again = Ipam::new(&f, net);
        assert_eq!(again.allocate("vps-2").unwrap(), b);
        for i in 3..=5 {
            again.allocate(&format!("vps-{i}")).unwrap();
        }
        assert!(
            matches!(again.allocate("vps-6"), Err(NetError::Exhausted(_))),
            "gateway and broadcast are never handed out"
        );
        assert_eq!(again.release("vps-1").unwrap(), Some(a));
        assert_eq!(again.release("vps-1").unwrap(), None);
        assert_eq!(
            again.allocate("vps-6").unwrap(),
            a,
            "a released address is reused"
        );
    }
}
