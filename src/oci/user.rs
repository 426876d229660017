//! The image's `User` (`name`, `uid`, `name:group`, `uid:gid`), resolved
//! the way runc and Docker resolve it: against the image's own
//! `/etc/passwd` and `/etc/group`, read from its layers, never the node's.

/// Who the container's process runs as.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageUser {
    pub uid: u32,
    pub gid: u32,
    /// Groups that list the user as a member (for a named user).
    pub additional_gids: Vec<u32>,
    /// From passwd, for `HOME` when the image sets none.
    pub home: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("the image's User {user:?} names a user that its /etc/passwd does not have")]
    NoUser { user: String },
    #[error("the image's User {user:?} names a group that its /etc/group does not have")]
    NoGroup { user: String },
}

struct Passwd<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = Passwd<'_>> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7).then_some(())?;
        Some(Passwd {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
        })
    })
}

/// (name, gid, members) of each line of an /etc/group.
fn group_entries(text: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4).then_some(())?;
        let members = f[3].split(',').filter(|m| !m.is_empty()).collect();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

/// Resolves `user` (the image config's `User`) against the image's files
/// (`None` when the image has none).
pub fn resolve(
    user: &str,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<ImageUser, UserError> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let entry = passwd_entries(passwd.unwrap_or_default())
        .find(|p| p.name == u || u.parse::<u32>().is_ok_and(|n| n == p.uid));
    let (uid, mut gid, name, home) = match (u.parse::<u32>(), entry) {
        (_, Some(p)) => (p.uid, p.gid, Some(p.name), Some(p.home.to_string())),
        // A bare number need not be in passwd: its group is 0, as in runc.
        (Ok(n), None) => (n, 0, None, None),
        (Err(_), None) => {
            return Err(UserError::NoUser {
                user: user.to_string(),
            })
        }
    };
    let groups: Vec<(&str, u32, Vec<&str>)> = group_entries(group.unwrap_or_default()).collect();
    if let Some(g) = g {
        gid = match (g.parse::<u32>(), groups.iter().find(|(n, _, _)| *n == g)) {
            (_, Some((_, id, _))) => *id,
            (Ok(n), None) => n,
            (Err(_), None) => {
                return Err(UserError::NoGroup {
                    user: user.to_string(),
                })
            }
        };
    }
    let mut additional_gids: Vec<u32> = match (name, g) {
        // An explicit group replaces the supplementary ones (Docker's rule).
        (Some(n), None) => groups
            .iter()
            .filter(|(_, _, members)| members.contains(&n))
            .map(|(_, id, _)| *id)
            .filter(|id| *id != gid)
            .collect(),
        _ => Vec::new(),
    };
    additional_gids.dedup();
    Ok(ImageUser {
        uid,
        gid,
        additional_gids,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str =
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\nbroken line\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nvideo:x:44:app,other\nrender:x:105:app\n";

    #[test]
    fn users_resolve_in_the_images_own_files() {
        let r = |u: &str| resolve(u, Some(PASSWD), Some(GROUP));
        assert_eq!(
            r("app").unwrap(),
            ImageUser {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![44, 105],
                home: Some("/home/app".into()),
            }
        );
        assert_eq!(r("1000").unwrap().home.as_deref(), Some("/home/app"));
        let n = r("4242").unwrap();
        assert_eq!(
            (n.uid, n.gid, n.home),
            (4242, 0, None),
            "a bare uid needs no entry"
        );
        let g = r("app:video").unwrap();
        assert_eq!((g.uid, g.gid, g.additional_gids), (1000, 44, vec![]));
        assert_eq!(r("4242:4343").unwrap().gid, 4343);
        assert_eq!(r("root").unwrap().uid, 0);
        assert_eq!(
            r("nobody").unwrap_err(),
            UserError::NoUser {
                user: "nobody".into()
            }
        );
        assert!(matches!(r("app:nogroup"), Err(UserError::NoGroup { .. })));
        // An image without /etc/passwd: numbers only.
        assert_eq!(resolve("7", None, None).unwrap().uid, 7);
        assert!(resolve("app", None, None).is_err());
    }
}
