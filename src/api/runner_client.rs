//! The host's client of one node's runner API: one place that builds the
//! URLs, presents the host's token for that runner and decodes `ErrorBody`.

use std::time::Duration;

use super::ErrorBody;

/// Why a call to a runner did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum RunnerCallError {
    #[error("runner of {node:?} unreachable")]
    Unreachable {
        node: String,
        #[source]
        source: reqwest::Error,
    },
    /// It answered, but not with success: `message` is its own explanation.
    #[error("runner of {node:?} answered {status}: {message}")]
    Answered {
        node: String,
        status: reqwest::StatusCode,
        message: String,
    },
    #[error("runner of {node:?} sent an unreadable answer")]
    Decode {
        node: String,
        #[source]
        source: reqwest::Error,
    },
}

/// A node's runner API, as the host.
pub struct RunnerClient<'a> {
    pub http: &'a reqwest::Client,
    pub node: &'a str,
    /// The runner URL the node registered.
    pub url: &'a str,
    /// The token the host presents to this runner.
    pub token: &'a str,
}

impl RunnerClient<'_> {
    /// `method path` with an optional JSON body and query; a non-2xx answer
    /// is an error carrying the runner's message.
    pub async fn call<B: serde::Serialize + ?Sized>(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<reqwest::Response, RunnerCallError> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(self.token)
            .query(query)
            .timeout(timeout);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|source| RunnerCallError::Unreachable {
                node: self.node.to_string(),
                source,
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let message = ErrorBody::message_of(&text).unwrap_or(text);
        Err(RunnerCallError::Answered {
            node: self.node.to_string(),
            status,
            message,
        })
    }

    /// A successful answer's JSON body.
    pub async fn json<T: serde::de::DeserializeOwned>(
        &self,
        resp: reqwest::Response,
    ) -> Result<T, RunnerCallError> {
        resp.json().await.map_err(|source| RunnerCallError::Decode {
            node: self.node.to_string(),
            source,
        })
    }
}
