//! The runner's client of the host API: one place that builds the URLs of
//! the node routes, sends the node's credential and decodes `ErrorBody`.

use std::sync::RwLock;
use std::time::Duration;

use super::{
    Assignments, ErrorBody, HeartbeatRequest, RegisterRequest, RegisterResponse, TaskProgress,
    TaskReport,
};

/// Why a call to the host did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum HostCallError {
    /// The host answered 4xx: retrying the same call cannot help.
    #[error("the host refused it ({status}): {message}")]
    Refused {
        status: reqwest::StatusCode,
        message: String,
    },
    /// 5xx, or no answer: worth retrying.
    #[error("the host answered {status}: {message}")]
    Failed {
        status: reqwest::StatusCode,
        message: String,
    },
    #[error("cannot reach the host")]
    Unreachable(#[source] reqwest::Error),
    #[error("unreadable answer from the host")]
    Decode(#[source] reqwest::Error),
}

impl HostCallError {
    /// A refusal for good: the host understood the call and will never take
    /// it (400, 409, 422, and its own 404 for a task it does not have, as
    /// after a database reset: retrying that would hold up every later
    /// report of the node). 401, other 404s, 408 or 429 can come from a
    /// proxy or a node between registrations, and are worth retrying.
    pub fn is_refusal(&self) -> bool {
        match self {
            HostCallError::Refused { status, message } => match status.as_u16() {
                400 | 409 | 422 => true,
                404 => message.starts_with("no task "),
                _ => false,
            },
            _ => false,
        }
    }
}

/// The node routes of the host API, as one node.
pub struct HostClient {
    http: reqwest::Client,
    base: String,
    node: String,
    /// Replaced when the node registers again.
    credential: RwLock<String>,
}

impl HostClient {
    pub fn new(http: reqwest::Client, base: &str, node: &str, credential: &str) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            node: node.to_string(),
            credential: RwLock::new(credential.to_string()),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn set_credential(&self, credential: &str) {
        *self.credential.write().unwrap_or_else(|p| p.into_inner()) = credential.to_string();
    }

    fn credential(&self) -> String {
        self.credential
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `POST /api/nodes/register` with the cluster's join token (before the
    /// node has a credential, so no client of it exists yet).
    pub async fn register(
        http: &reqwest::Client,
        base: &str,
        join_token: &str,
        req: &RegisterRequest,
    ) -> Result<RegisterResponse, HostCallError> {
        Self::answer(
            http.post(format!("{}/api/nodes/register", base.trim_end_matches('/')))
                .bearer_auth(join_token)
                .json(req),
        )
        .await
    }

    /// `PUT /api/nodes/{name}/heartbeat` with the node's credential.
    pub async fn heartbeat(
        http: &reqwest::Client,
        base: &str,
        node: &str,
        credential: &str,
        hb: &HeartbeatRequest,
    ) -> Result<super::HeartbeatReply, HostCallError> {
        let resp = http
            .put(format!(
                "{}/api/nodes/{node}/heartbeat",
                base.trim_end_matches('/')
            ))
            .bearer_auth(credential)
            .json(hb)
            .send()
            .await
            .map_err(HostCallError::Unreachable)?;
        let body = Self::check(resp)
            .await?
            .bytes()
            .await
            .map_err(HostCallError::Decode)?;
        // An older host answers 204 with no body: nothing to learn.
        if body.is_empty() {
            return Ok(super::HeartbeatReply::default());
        }
        Ok(serde_json::from_slice(&body).unwrap_or_default())
    }

    /// `GET /api/whoami` with the node's credential: what the host says of
    /// itself (its SSH proxy's port).
    pub async fn whoami(
        http: &reqwest::Client,
        base: &str,
        credential: &str,
    ) -> Result<super::WhoAmI, HostCallError> {
        Self::answer(
            http.get(format!("{}/api/whoami", base.trim_end_matches('/')))
                .bearer_auth(credential),
        )
        .await
    }

    /// Sends `req` and reads its JSON answer.
    async fn answer<T: serde::de::DeserializeOwned>(
        req: reqwest::RequestBuilder,
    ) -> Result<T, HostCallError> {
        let resp = req.send().await.map_err(HostCallError::Unreachable)?;
        Self::check(resp)
            .await?
            .json()
            .await
            .map_err(HostCallError::Decode)
    }

    async fn check(resp: reqwest::Response) -> Result<reqwest::Response, HostCallError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let message = ErrorBody::message_of(&text).unwrap_or(text);
        Err(if status.is_client_error() {
            HostCallError::Refused { status, message }
        } else {
            HostCallError::Failed { status, message }
        })
    }

    /// The node's assignments; with `after`, a long poll that answers when
    /// they change after that revision (or after `wait`).
    pub async fn assignments(
        &self,
        after: Option<u64>,
        wait: Duration,
    ) -> Result<Assignments, HostCallError> {
        let mut req = self
            .http
            .get(format!("{}/api/nodes/{}/assignments", self.base, self.node))
            .bearer_auth(self.credential())
            .timeout(wait + Duration::from_secs(20));
        if let Some(r) = after {
            req = req.query(&[
                ("after", r.to_string()),
                ("wait_ms", wait.as_millis().to_string()),
            ]);
        }
        Self::answer(req).await
    }

    /// What the runner observed of task `id`. The host applies a repeated
    /// report once, so a retry after a lost answer is safe.
    pub async fn report(&self, id: u64, report: &TaskReport) -> Result<(), HostCallError> {
        self.put_task(&format!("tasks/{id}"), report, Duration::from_secs(10))
            .await
    }

    /// How far making task `id` got. Best effort: a lost one is followed
    /// by a newer one, or made moot by the task's next report.
    pub async fn progress(&self, id: u64, p: &TaskProgress) -> Result<(), HostCallError> {
        self.put_task(&format!("tasks/{id}/progress"), p, Duration::from_secs(5))
            .await
    }

    /// Asks the host to publish the image's `EXPOSE`d ports of VPS `id`;
    /// its placement after.
    pub async fn expose(
        &self,
        id: u64,
        req: &crate::api::ports::ExposeRequest,
    ) -> Result<crate::api::Placement, HostCallError> {
        self.task_call(reqwest::Method::PUT, id, "expose", req)
            .await
    }

    /// Hands on what instance `id` asked of itself with its key; the
    /// instance as the host shows it after.
    pub async fn instance_self(
        &self,
        id: u64,
        req: &crate::api::instance_key::SelfRequest,
    ) -> Result<crate::api::TaskView, HostCallError> {
        self.task_call(reqwest::Method::POST, id, "self", req).await
    }

    /// An environment archive's size and digest, for a node without the
    /// host's shared directory.
    pub async fn environment(
        &self,
        env: &str,
    ) -> Result<crate::api::EnvironmentArchive, HostCallError> {
        Self::answer(
            self.http
                .get(format!(
                    "{}/api/nodes/{}/environments/{env}",
                    self.base, self.node
                ))
                .bearer_auth(self.credential())
                .timeout(Duration::from_secs(600)),
        )
        .await
    }

    /// The archive's bytes from `from` on, as long as it still has the
    /// digest `sha256` (412 otherwise). No overall deadline: an archive can
    /// take long; the caller gives up on a stalled body (`envfetch`).
    pub async fn environment_archive(
        &self,
        env: &str,
        from: u64,
        sha256: &str,
    ) -> Result<reqwest::Response, HostCallError> {
        self.archive(&format!("environments/{env}/archive"), from, sha256)
            .await
    }

    /// This node removed what VPS `id` left here when it moved away.
    pub async fn left_removed(&self, id: u64) -> Result<(), HostCallError> {
        let resp = self
            .http
            .delete(format!("{}/api/nodes/{}/left/{id}", self.base, self.node))
            .bearer_auth(self.credential())
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map_err(HostCallError::Unreachable)?;
        Self::check(resp).await.map(|_| ())
    }

    /// VPS `id`'s parked copy: its snapshot, size, digest and host key.
    pub async fn parked(&self, id: u64) -> Result<crate::api::ParkedVps, HostCallError> {
        Self::answer(
            self.http
                .get(format!("{}/api/nodes/{}/parked/{id}", self.base, self.node))
                .bearer_auth(self.credential())
                .timeout(Duration::from_secs(60)),
        )
        .await
    }

    /// Where VPS `id`, moving here node to node, is fetched from: the
    /// runner of the node it left, a grant for its snapshots, and the copy.
    pub async fn move_source(&self, id: u64) -> Result<crate::api::MoveSource, HostCallError> {
        Self::answer(
            self.http
                .get(format!("{}/api/nodes/{}/moves/{id}", self.base, self.node))
                .bearer_auth(self.credential())
                .timeout(Duration::from_secs(120)),
        )
        .await
    }

    /// Where the snapshot new VPS `id` starts from is fetched from, node to
    /// node: the runner of the node that keeps it, and a grant for it.
    pub async fn clone_source(&self, id: u64) -> Result<crate::api::MoveSource, HostCallError> {
        Self::answer(
            self.http
                .get(format!("{}/api/nodes/{}/clones/{id}", self.base, self.node))
                .bearer_auth(self.credential())
                .timeout(Duration::from_secs(120)),
        )
        .await
    }

    /// Blob `digest` of VPS `id`'s snapshots from `from` on, from the
    /// runner at `url` with `grant` (a move node to node).
    pub async fn node_blob(
        &self,
        (url, grant): (&str, &str),
        id: u64,
        digest: &str,
        from: u64,
    ) -> Result<reqwest::Response, HostCallError> {
        let resp = self
            .http
            .get(format!("{url}/api/transfers/{id}/blobs/{digest}"))
            .bearer_auth(grant)
            .header(reqwest::header::RANGE, format!("bytes={from}-"))
            .header(
                crate::api::EXPECT_SHA256,
                digest.trim_start_matches("sha256:"),
            )
            .send()
            .await
            .map_err(HostCallError::Unreachable)?;
        Self::check(resp).await
    }

    /// The bytes of blob `digest` of an archive (`of`: `environments/<name>`
    /// or `parked/<id>`) from `from` on (`sha256`: the digest's hex).
    pub async fn archive_blob(
        &self,
        of: &str,
        digest: &str,
        from: u64,
        sha256: &str,
    ) -> Result<reqwest::Response, HostCallError> {
        self.archive(&format!("{of}/blobs/{digest}"), from, sha256)
            .await
    }

    /// Parks VPS `id`'s stop snapshot as `req` says; the blobs the host
    /// still lacks (none: the copy is made).
    pub async fn park(
        &self,
        id: u64,
        req: &crate::api::ParkRequest,
    ) -> Result<crate::api::ParkAnswer, HostCallError> {
        Self::answer(
            self.http
                .put(format!(
                    "{}/api/nodes/{}/tasks/{id}/park",
                    self.base, self.node
                ))
                .bearer_auth(self.credential())
                .timeout(Duration::from_secs(60))
                .json(req),
        )
        .await
    }

    /// One piece of blob `digest` of VPS `id`'s park, from `offset` on, of
    /// `total` bytes in all.
    pub async fn park_blob(
        &self,
        id: u64,
        digest: &str,
        offset: u64,
        total: u64,
        piece: Vec<u8>,
    ) -> Result<(), HostCallError> {
        let resp = self
            .http
            .put(format!(
                "{}/api/nodes/{}/tasks/{id}/park/blobs/{digest}",
                self.base, self.node
            ))
            .bearer_auth(self.credential())
            .header("x-upload-offset", offset.to_string())
            .header("x-upload-total", total.to_string())
            .timeout(Duration::from_secs(600))
            .body(piece)
            .send()
            .await
            .map_err(HostCallError::Unreachable)?;
        Self::check(resp).await.map(|_| ())
    }

    /// `GET /api/nodes/<node>/<what>` from byte `from`, while it has the
    /// digest `sha256`. No overall deadline: an archive can take long; the
    /// caller gives up on a stalled body (`envfetch`).
    async fn archive(
        &self,
        what: &str,
        from: u64,
        sha256: &str,
    ) -> Result<reqwest::Response, HostCallError> {
        let resp = self
            .http
            .get(format!("{}/api/nodes/{}/{what}", self.base, self.node))
            .bearer_auth(self.credential())
            .header(reqwest::header::RANGE, format!("bytes={from}-"))
            .header(crate::api::EXPECT_SHA256, sha256)
            .send()
            .await
            .map_err(HostCallError::Unreachable)?;
        Self::check(resp).await
    }

    /// `method` at `/api/nodes/<node>/tasks/<id>/<what>` with a JSON body; its JSON answer.
    async fn task_call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        id: u64,
        what: &str,
        body: &impl serde::Serialize,
    ) -> Result<T, HostCallError> {
        let call = self
            .http
            .request(
                method,
                format!("{}/api/nodes/{}/tasks/{id}/{what}", self.base, self.node),
            )
            .bearer_auth(self.credential())
            .timeout(Duration::from_secs(10))
            .json(body);
        Self::answer(call).await
    }

    /// PUT `body` at this node's `/api/nodes/<node>/<path>`.
    async fn put_task(
        &self,
        path: &str,
        body: &impl serde::Serialize,
        timeout: Duration,
    ) -> Result<(), HostCallError> {
        let resp = self
            .http
            .put(format!("{}/api/nodes/{}/{path}", self.base, self.node))
            .bearer_auth(self.credential())
            .timeout(timeout)
            .json(body)
            .send()
            .await
            .map_err(HostCallError::Unreachable)?;
        Self::check(resp).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_hosts_own_answers_are_refusals_for_good() {
        let refused = |code: u16, message: &str| HostCallError::Refused {
            status: reqwest::StatusCode::from_u16(code).unwrap(),
            message: message.into(),
        };
        assert!(refused(409, "x").is_refusal());
        assert!(refused(404, "no task 7; `rivernode task list` shows the tasks").is_refusal());
        assert!(
            !refused(404, "<html>Not Found</html>").is_refusal(),
            "a proxy's 404"
        );
        assert!(!refused(401, "x").is_refusal());
    }
}
