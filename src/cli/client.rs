//! The CLI's connection to the host API: where the host is and which token
//! to present, found from flags, a local data directory or the user's config.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::api::token::read as read_token;
use crate::api::ErrorBody;
use crate::host::{ADMIN_TOKEN_FILE, API_URL_FILE};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/rivernode";
const DEFAULT_URL: &str = "http://127.0.0.1:8000";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no API token: pass --token or set RIVERNODE_TOKEN, or on the host machine use --data-dir DIR (reads DIR/admin.token)")]
    NoToken,
    #[error("{path}: {message}")]
    UserConfig { path: PathBuf, message: String },
    #[error("cannot reach the host at {url}; is `rivernode host` (or `rivernode up`) running? Set the address with --host or RIVERNODE_HOST")]
    Connect { url: String, source: reqwest::Error },
    #[error("{message} (HTTP {status})")]
    Api { status: u16, message: String },
    #[error("unreadable answer from {url}")]
    Decode { url: String, source: reqwest::Error },
    /// The command line asks for something that cannot be done as written.
    #[error("{0}")]
    Usage(String),
}

/// `~/.config/rivernode/client.toml`: `host = "..."`, `token = "..."`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserConfig {
    host: Option<String>,
    token: Option<String>,
}

/// The host's URL: the flag, else the data directory's api.url, else the
/// user's client.toml, else loopback.
fn base_url(host: Option<String>, dir: &Path, configured: Option<String>) -> String {
    host.or_else(|| read_token(&dir.join(API_URL_FILE)))
        .or(configured)
        .unwrap_or_else(|| DEFAULT_URL.to_string())
        .trim_end_matches('/')
        .to_string()
}

/// `rivernode login --invite CODE --name NAME`: redeems the invitation at
/// the host and keeps the new token (and the host) in the user's
/// client.toml (0600), which later commands read. An existing token there
/// is kept unless `force`.
pub async fn login(
    host: Option<String>,
    data_dir: Option<&Path>,
    code: &str,
    name: &str,
    force: bool,
) -> Result<(crate::api::NewUser, PathBuf), ClientError> {
    let home = std::env::var_os("HOME")
        .ok_or_else(|| ClientError::Usage("HOME is not set: no place for client.toml".into()))?;
    let path = Path::new(&home).join(".config/rivernode/client.toml");
    let existing = user_config()?;
    if existing.token.is_some() && !force {
        return Err(ClientError::UserConfig {
            path,
            message: "already holds a token; --force replaces it (the old one keeps working until rotated)".into(),
        });
    }
    let io = |e: std::io::Error| ClientError::UserConfig {
        path: path.clone(),
        message: e.to_string(),
    };
    // Where the token goes is made first: a code is spent once, and a token
    // with nowhere to go would be lost.
    if let Some(dir) = path.parent() {
        crate::files::ensure_private_dir(dir).map_err(io)?;
    }
    let base = base_url(
        host,
        data_dir.unwrap_or(Path::new(DEFAULT_DATA_DIR)),
        existing.host,
    );
    let url = format!("{base}/api/invitations/redeem");
    let resp = reqwest::Client::new()
        .post(&url)
        .bearer_auth(code)
        .json(&serde_json::json!({ "name": name }))
        .timeout(std::time::Duration::from_secs(30))
        .send()
        .await
        .map_err(|source| ClientError::Connect {
            url: base.clone(),
            source,
        })?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Err(ClientError::Api {
            status: status.as_u16(),
            message: ErrorBody::message_of(&text).unwrap_or(text),
        });
    }
    let user: crate::api::NewUser = resp
        .json()
        .await
        .map_err(|source| ClientError::Decode { url, source })?;
    let text = format!("host = {:?}\ntoken = {:?}\n", base, user.token);
    if let Err(e) = crate::files::write_secret(&path, text.as_bytes()) {
        // The account exists now: its token is said here, once, not lost.
        return Err(ClientError::UserConfig {
            path: path.clone(),
            message: format!(
                "{e}; you are user {}, and your token (keep it: it is shown once) is {}",
                user.name, user.token
            ),
        });
    }
    Ok((user, path))
}

/// `rivernode token rotate`: a new token for whoever `client`'s token is
/// (a person, or the admin); the old one is revoked. When the token came
/// from the user's client.toml, the new one replaces it there (the path is
/// returned); a token given otherwise is the caller's to keep.
pub async fn rotate_own(
    client: &Client,
    expires_in: Option<crate::config::HumanDuration>,
) -> Result<(crate::api::NewUser, Option<PathBuf>), ClientError> {
    let w: crate::api::WhoAmI = client.get("/api/whoami").await?;
    let name = match (w.user, w.role.as_str()) {
        (Some(u), _) => u,
        (None, "admin") => "admin".to_string(),
        _ => {
            return Err(ClientError::Usage(format!(
                "this token is a {}'s: only a person's or the admin's token rotates",
                w.role
            )))
        }
    };
    let kept = user_config()?;
    let held = kept.token.as_deref() == Some(client.token());
    let user: crate::api::NewUser = client
        .post(
            &format!("/api/users/{name}/token"),
            &serde_json::json!({
                "expires_in_ms": expires_in.map(|d| d.0.as_millis() as u64),
            }),
        )
        .await?;
    if !held {
        return Ok((user, None));
    }
    let path = user_config_path()?;
    // The file's host stays (a --host given for this call is not kept).
    let host = kept.host.unwrap_or_else(|| client.base.clone());
    let text = format!("host = {host:?}\ntoken = {:?}\n", user.token);
    if let Err(e) = crate::files::write_secret(&path, text.as_bytes()) {
        // The old token is revoked: the new one is said here, once, not lost.
        return Err(ClientError::UserConfig {
            path,
            message: format!(
                "{e}; your new token (keep it: it is shown once) is {}",
                user.token
            ),
        });
    }
    Ok((user, Some(path)))
}

fn user_config_path() -> Result<PathBuf, ClientError> {
    let home = std::env::var_os("HOME")
        .ok_or_else(|| ClientError::Usage("HOME is not set: no place for client.toml".into()))?;
    Ok(Path::new(&home).join(".config/rivernode/client.toml"))
}

fn user_config() -> Result<UserConfig, ClientError> {
    let Some(home) = std::env::var_os("HOME") else {
        return Ok(UserConfig::default());
    };
    let path = Path::new(&home).join(".config/rivernode/client.toml");
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).map_err(|e| ClientError::UserConfig {
            path,
            message: e.message().trim().to_string(),
        }),
        Err(_) => Ok(UserConfig::default()),
    }
}

pub struct Client {
    http: reqwest::Client,
    pub base: String,
    token: String,
}

impl Client {
    /// Flags first, then the data directory (the default one when not given,
    /// if readable), then the user's client.toml, then loopback.
    pub fn resolve(
        host: Option<String>,
        token: Option<String>,
        data_dir: Option<&Path>,
    ) -> Result<Self, ClientError> {
        let user = user_config()?;
        let dir = data_dir.unwrap_or(Path::new(DEFAULT_DATA_DIR));
        let base = base_url(host, dir, user.host);
        let token = token
            .or_else(|| read_token(&dir.join(ADMIN_TOKEN_FILE)))
            .or(user.token)
            .ok_or(ClientError::NoToken)?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("rivernode-cli/", env!("CARGO_PKG_VERSION")))
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|source| ClientError::Connect {
                url: base.clone(),
                source,
            })?;
        Ok(Self { http, base, token })
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let resp = self.send(self.http.get(&url), &url).await?;
        resp.json()
            .await
            .map_err(|source| ClientError::Decode { url, source })
    }

    pub async fn post<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let resp = self.send(self.http.post(&url).json(body), &url).await?;
        resp.json()
            .await
            .map_err(|source| ClientError::Decode { url, source })
    }

    /// `post` for work that takes as long as the data it moves (a snapshot
    /// of a large disk): the client's usual 30 s would give up too soon.
    pub async fn post_long<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let req = self
            .http
            .post(&url)
            .json(body)
            .timeout(std::time::Duration::from_secs(3600));
        let resp = self.send(req, &url).await?;
        resp.json()
            .await
            .map_err(|source| ClientError::Decode { url, source })
    }

    /// Raw bytes and the `x-next-offset` header (for logs).
    pub async fn get_bytes(&self, path: &str) -> Result<(Vec<u8>, Option<u64>), ClientError> {
        let url = format!("{}{path}", self.base);
        let resp = self.send(self.http.get(&url), &url).await?;
        let next = resp
            .headers()
            .get("x-next-offset")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Decode { url, source })?;
        Ok((body.to_vec(), next))
    }

    /// PUT `body`; the answer's body is not read (204).
    pub async fn put<B: serde::Serialize>(&self, path: &str, body: &B) -> Result<(), ClientError> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.put(&url).json(body), &url)
            .await
            .map(|_| ())
    }

    /// `DELETE path`, reading the JSON it answers.
    pub async fn delete_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let resp = self.send(self.http.delete(&url), &url).await?;
        resp.json()
            .await
            .map_err(|source| ClientError::Decode { url, source })
    }

    pub async fn delete(&self, path: &str) -> Result<(), ClientError> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.delete(&url), &url).await.map(|_| ())
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|source| ClientError::Connect {
                url: self.base.clone(),
                source,
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let message = ErrorBody::message_of(&text).unwrap_or_else(|| format!("{url}: {text}"));
        Err(ClientError::Api {
            status: status.as_u16(),
            message,
        })
    }
}
