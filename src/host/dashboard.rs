//! The web dashboard at `/`: a page and its two bundles, built from `web/`
//! by `build.rs` and embedded here, so the host serves it offline with no
//! files beside the binary. The page holds no data: it signs in with a
//! token the person pastes and then calls the same authenticated API as
//! the CLI, so these routes need none.

use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use axum::http::HeaderName;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

const INDEX: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/web/index.html"));
const APP_JS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/web/app.js"));
const APP_CSS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/web/app.css"));

/// Only the host's own scripts, stylesheets and API: an injected string in
/// a task's name or log cannot run, and no page elsewhere may frame this
/// one. `connect-src 'self'` covers the exec websocket on the same origin.
/// Style *attributes* may be inline: xterm.js colours 24-bit text with
/// them, and with no other source of fonts or images allowed, a style can
/// carry nothing out of the page.
pub const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     style-src-attr 'unsafe-inline'; img-src 'self' data:; font-src 'self'; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(
    body: &'static [u8],
    kind: &'static str,
) -> ([(HeaderName, &'static str); 6], &'static [u8]) {
    (
        [
            (CONTENT_TYPE, kind),
            (CONTENT_SECURITY_POLICY, POLICY),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (X_FRAME_OPTIONS, "DENY"),
            (REFERRER_POLICY, "no-referrer"),
            // Small, and a new binary may bring new bundles: always asked again.
            (CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { asset(INDEX, "text/html; charset=utf-8").into_response() }),
        )
        .route(
            "/assets/app.js",
            get(|| async { asset(APP_JS, "text/javascript; charset=utf-8").into_response() }),
        )
        .route(
            "/assets/app.css",
            get(|| async { asset(APP_CSS, "text/css; charset=utf-8").into_response() }),
        )
}
