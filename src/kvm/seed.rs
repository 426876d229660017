//! The NoCloud seed a VM boots with: `meta-data`, `user-data` and
//! `network-config` on an ISO 9660 image labelled `cidata`, which
//! cloud-init (and our own small reader in test images) finds by its label.
//!
//! The bodies are JSON, which is YAML too, so no YAML writer is needed. The
//! image is written here, in-process and byte for byte reproducible: a
//! primary volume for the label and a Joliet volume for the names (ISO
//! 9660 names cannot hold `-`, so without Joliet `meta-data` reads back as
//! `meta_dat`). One flat directory of small files is all NoCloud needs.

use std::net::Ipv4Addr;

use serde_json::json;

use crate::net::firewall::mac_text;

/// What the guest is told about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedInput {
    /// The instance UUID: cloud-init runs its once-per-instance work again
    /// only when this changes.
    pub instance_id: String,
    pub hostname: String,
    /// Public keys that may log in as root.
    pub ssh_keys: Vec<String>,
    /// root's password as a crypt(3) hash, when one was set.
    pub password_hash: Option<String>,
    /// The instance's SSH host key (OpenSSH private key text) and its public
    /// line: the runner makes it, so the host key is known before boot and
    /// clients pin it, as for containers.
    pub host_key: Option<(String, String)>,
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub nameservers: Vec<Ipv4Addr>,
}

/// `meta-data`.
pub fn meta_data(s: &SeedInput) -> String {
    json!({"instance-id": s.instance_id, "local-hostname": s.hostname}).to_string() + "\n"
}

/// `user-data`: root's keys (and password hash, if any), the pinned host
/// key and nothing else; never a password login without a password set.
pub fn user_data(s: &SeedInput) -> String {
    let mut root = json!({
        "name": "root",
        "lock_passwd": s.password_hash.is_none(),
        "ssh_authorized_keys": s.ssh_keys,
    });
    if let Some(h) = &s.password_hash {
        root["hashed_passwd"] = json!(h);
    }
    let mut doc = json!({
        "hostname": s.hostname,
        "disable_root": false,
        "ssh_pwauth": s.password_hash.is_some(),
        "users": [root],
    });
    if let Some((private, public)) = &s.host_key {
        // Ours replaces whatever the image had. cloud-init generates no
        // key when ssh_keys is given (and its schema refuses an empty
        // ssh_genkeytypes, so that is not said).
        doc["ssh_deletekeys"] = json!(true);
        doc["ssh_keys"] = json!({"ed25519_private": private, "ed25519_public": public});
    }
    format!("#cloud-config\n{doc}\n")
}

/// `network-config` (version 2): the static address IPAM gave, matched by MAC.
pub fn network_config(s: &SeedInput) -> String {
    json!({
        "version": 2,
        "ethernets": {
            "eth0": {
                "match": {"macaddress": mac_text(s.mac)},
                "set-name": "eth0",
                "addresses": [format!("{}/{}", s.ip, s.prefix)],
                "routes": [{"to": "0.0.0.0/0", "via": s.gateway.to_string()}],
                "nameservers": {"addresses": s.nameservers.iter().map(|n| n.to_string()).collect::<Vec<_>>()},
            }
        }
    })
    .to_string()
        + "\n"
}

/// The seed image for `s`.
pub fn seed_iso(s: &SeedInput) -> Vec<u8> {
    iso9660(
        "cidata",
        &[
            ("meta-data", meta_data(s).into_bytes()),
            ("network-config", network_config(s).into_bytes()),
            ("user-data", user_data(s).into_bytes()),
        ],
    )
}

const SECTOR: usize = 2048;

fn both16(v: u16) -> [u8; 4] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], b[0], b[1]]
}

fn both32(v: u32) -> [u8; 8] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], l[2], l[3], b[0], b[1], b[2], b[3]]
}

/// A name of ISO 9660 level 1 (8.3, `A-Z 0-9 _`) for `name`, with `;1`.
fn primary_name(name: &str, taken: &[Vec<u8>]) -> Vec<u8> {
    let clean = |s: &str, n: usize| -> String {
        s.chars()
            .map(|c| match c.to_ascii_uppercase() {
                c @ ('A'..='Z' | '0'..='9') => c,
                _ => '_',
            })
            .take(n)
            .collect()
    };
    let (stem, ext) = name.rsplit_once('.').unwrap_or((name, ""));
    let (mut stem, ext) = (clean(stem, 8), clean(ext, 3));
    let mut i = 0;
    loop {
        let out = format!("{stem}.{ext};1").into_bytes();
        if !taken.contains(&out) {
            return out;
        }
        // Two names that fold alike: number the later one.
        i += 1;
        let n = i.to_string();
        stem = format!("{}{n}", &stem[..stem.len().min(8 - n.len())]);
    }
}

/// UCS-2 big-endian, as Joliet stores names and identifiers.
fn ucs2(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_be_bytes()).collect()
}

/// One directory record: `extent` and `size` of what it points at.
fn dir_record(name: &[u8], extent: u32, size: u32, dir: bool) -> Vec<u8> {
    let len = 33 + name.len() + (name.len() + 1) % 2;
    let mut r = vec![0u8; len];
    r[0] = len as u8;
    r[2..10].copy_from_slice(&both32(extent));
    r[10..18].copy_from_slice(&both32(size));
    // 1970-01-01 00:00:00 UTC: the image is the same for the same input.
    r[18] = 70;
    r[19] = 1;
    r[20] = 1;
    r[25] = if dir { 2 } else { 0 };
    r[28..32].copy_from_slice(&both16(1));
    r[32] = name.len() as u8;
    r[33..33 + name.len()].copy_from_slice(name);
    r
}

/// An ISO 9660 image (primary volume labelled `label`, plus Joliet) with
/// `files` in its root directory. Small files only: the root directory
/// must fit one sector (a few dozen names).
pub fn iso9660(label: &str, files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    // Sectors: 16 primary, 17 Joliet, 18 terminator, 19-22 path tables
    // (L and M of each), 23 and 24 the two root directories, then data.
    const ROOT: [u32; 2] = [23, 24];
    let mut next = 25u32;
    let extents: Vec<u32> = files
        .iter()
        .map(|(_, data)| {
            let at = next;
            next += data.len().div_ceil(SECTOR).max(1) as u32;
            at
        })
        .collect();
    let total = next;
    let mut img = vec![0u8; total as usize * SECTOR];
    let mut primary: Vec<Vec<u8>> = Vec::new();
    for (name, _) in files {
        let n = primary_name(name, &primary);
        primary.push(n);
    }
    let joliet: Vec<Vec<u8>> = files.iter().map(|(n, _)| ucs2(n)).collect();
    for (v, names) in [&primary, &joliet].into_iter().enumerate() {
        // The root: "." and "..", then its files in the order of their names.
        let mut dir = dir_record(&[0], ROOT[v], SECTOR as u32, true);
        dir.extend(dir_record(&[1], ROOT[v], SECTOR as u32, true));
        let mut order: Vec<usize> = (0..files.len()).collect();
        order.sort_by(|&a, &b| names[a].cmp(&names[b]));
        for i in order {
            dir.extend(dir_record(
                &names[i],
                extents[i],
                files[i].1.len() as u32,
                false,
            ));
        }
        assert!(
            dir.len() <= SECTOR,
            "a seed's root directory fits one sector"
        );
        let at = ROOT[v] as usize * SECTOR;
        img[at..at + dir.len()].copy_from_slice(&dir);
        // Path tables: the root alone, little-endian (L) then big-endian (M).
        let (l, m) = (19 + 2 * v, 20 + 2 * v);
        let mut rec = [1u8, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        rec[2..6].copy_from_slice(&ROOT[v].to_le_bytes());
        img[l * SECTOR..l * SECTOR + 10].copy_from_slice(&rec);
        rec[2..6].copy_from_slice(&ROOT[v].to_be_bytes());
        rec[6..8].copy_from_slice(&1u16.to_be_bytes());
        img[m * SECTOR..m * SECTOR + 10].copy_from_slice(&rec);
        // The volume descriptor.
        let d = &mut img[(16 + v) * SECTOR..(17 + v) * SECTOR];
        d[0] = 1 + v as u8;
        d[1..6].copy_from_slice(b"CD001");
        d[6] = 1;
        let text = |d: &mut [u8], range: std::ops::Range<usize>, s: &str| {
            let bytes = if v == 0 {
                s.as_bytes().to_vec()
            } else {
                ucs2(s)
            };
            // Space-padded: ASCII spaces, or UCS-2 spaces (00 20) in Joliet.
            for (i, b) in d[range.clone()].iter_mut().enumerate() {
                *b = bytes
                    .get(i)
                    .copied()
                    .unwrap_or(if v == 1 && i % 2 == 0 { 0 } else { b' ' });
            }
        };
        text(d, 8..40, "");
        text(d, 40..72, label);
        d[80..88].copy_from_slice(&both32(total));
        if v == 1 {
            d[88..91].copy_from_slice(b"%/E"); // Joliet, UCS-2 level 3
        }
        d[120..124].copy_from_slice(&both16(1));
        d[124..128].copy_from_slice(&both16(1));
        d[128..132].copy_from_slice(&both16(SECTOR as u16));
        d[132..140].copy_from_slice(&both32(10));
        d[140..144].copy_from_slice(&(l as u32).to_le_bytes());
        d[148..152].copy_from_slice(&(m as u32).to_be_bytes());
        let root = dir_record(&[0], ROOT[v], SECTOR as u32, true);
        d[156..190].copy_from_slice(&root);
        for range in [190..318, 318..446, 446..574, 574..702] {
            text(d, range, "");
        }
        for range in [702..739, 739..776, 776..813] {
            text(d, range, "");
        }
        // Made and modified at the epoch (reproducible); expiry and
        // effective dates "not specified" (digits zero), per ECMA-119.
        for at in [813, 830] {
            d[at..at + 16].copy_from_slice(b"1970010100000000");
        }
        for at in [847, 864] {
            d[at..at + 16].copy_from_slice(b"0000000000000000");
        }
        d[881] = 1;
    }
    let t = &mut img[18 * SECTOR..19 * SECTOR];
    t[0] = 255;
    t[1..6].copy_from_slice(b"CD001");
    t[6] = 1;
    for (i, (_, data)) in files.iter().enumerate() {
        let at = extents[i] as usize * SECTOR;
        img[at..at + data.len()].copy_from_slice(data);
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> SeedInput {
        SeedInput {
            instance_id: "3f2a9c1e-0000-4000-8000-00000000002a".into(),
            hostname: "vps-42".into(),
            ssh_keys: vec!["ssh-ed25519 AAAAC3Nza alice@laptop".into()],
            password_hash: None,
            host_key: Some((
                "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----\n"
                    .into(),
                "ssh-ed25519 AAAAhost".into(),
            )),
            mac: [0x0a, 0x58, 10, 250, 0, 42],
            ip: "10.250.0.42".parse().unwrap(),
            prefix: 24,
            gateway: "10.250.0.1".parse().unwrap(),
            nameservers: vec!["10.250.0.1".parse().unwrap()],
        }
    }

    #[test]
    fn user_data_gives_root_the_keys_and_no_password_login_without_a_password() {
        let text = user_data(&input());
        let body = text.strip_prefix("#cloud-config\n").unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["users"][0]["name"], "root");
        assert_eq!(v["users"][0]["lock_passwd"], true);
        assert_eq!(v["ssh_pwauth"], false);
        assert_eq!(
            v["users"][0]["ssh_authorized_keys"][0],
            "ssh-ed25519 AAAAC3Nza alice@laptop"
        );
        assert_eq!(v["ssh_keys"]["ed25519_public"], "ssh-ed25519 AAAAhost");
        assert!(
            v.get("ssh_genkeytypes").is_none(),
            "cloud-init's schema refuses an empty list"
        );
        let mut with_pw = input();
        with_pw.password_hash = Some("$6$salt$hash".into());
        let v: serde_json::Value =
            serde_json::from_str(user_data(&with_pw).strip_prefix("#cloud-config\n").unwrap())
                .unwrap();
        assert_eq!(v["users"][0]["hashed_passwd"], "$6$salt$hash");
        assert_eq!(
            (
                v["users"][0]["lock_passwd"].clone(),
                v["ssh_pwauth"].clone()
            ),
            (json!(false), json!(true))
        );
    }

    #[test]
    fn network_config_is_the_static_address_matched_by_mac() {
        let v: serde_json::Value = serde_json::from_str(&network_config(&input())).unwrap();
        let e = &v["ethernets"]["eth0"];
        assert_eq!(v["version"], 2);
        assert_eq!(e["match"]["macaddress"], "0a:58:0a:fa:00:2a");
        assert_eq!(e["addresses"][0], "10.250.0.42/24");
        assert_eq!(e["routes"][0]["via"], "10.250.0.1");
        let m: serde_json::Value = serde_json::from_str(&meta_data(&input())).unwrap();
        assert_eq!(m["instance-id"], "3f2a9c1e-0000-4000-8000-00000000002a");
    }

    #[test]
    fn primary_names_fold_to_level_one_and_stay_apart() {
        let mut taken = Vec::new();
        for (name, want) in [
            ("meta-data", "META_DAT.;1"),
            ("meta-dat", "META_DA1.;1"),
            ("network-config", "NETWORK_.;1"),
            ("a.json", "A.JSO;1"),
        ] {
            let n = primary_name(name, &taken);
            assert_eq!(String::from_utf8(n.clone()).unwrap(), want);
            taken.push(n);
        }
    }

    #[test]
    fn the_image_has_its_label_both_volumes_and_the_files_where_they_say() {
        let files = [
            ("meta-data", b"{}\n".to_vec()),
            ("user-data", vec![b'x'; 3000]),
        ];
        let img = iso9660("cidata", &files);
        assert_eq!(img.len() % SECTOR, 0);
        assert_eq!(img, iso9660("cidata", &files), "reproducible");
        let pvd = &img[16 * SECTOR..17 * SECTOR];
        assert_eq!(&pvd[1..6], b"CD001");
        assert_eq!(&pvd[40..46], b"cidata");
        let svd = &img[17 * SECTOR..18 * SECTOR];
        assert_eq!((svd[0], &svd[88..91]), (2, &b"%/E"[..]));
        assert_eq!(img[18 * SECTOR], 255);
        // Follow the Joliet root to user-data and read it back.
        let root = u32::from_le_bytes(svd[158..162].try_into().unwrap()) as usize;
        let dir = &img[root * SECTOR..(root + 1) * SECTOR];
        let mut at = 0;
        let mut found = None;
        while dir[at] != 0 {
            let len = dir[at] as usize;
            let name = &dir[at + 33..at + 33 + dir[at + 32] as usize];
            if name == ucs2("user-data").as_slice() {
                let extent = u32::from_le_bytes(dir[at + 2..at + 6].try_into().unwrap()) as usize;
                let size = u32::from_le_bytes(dir[at + 10..at + 14].try_into().unwrap()) as usize;
                found = Some(img[extent * SECTOR..extent * SECTOR + size].to_vec());
            }
            at += len;
        }
        assert_eq!(found.unwrap(), vec![b'x'; 3000]);
    }
}
