//! The dashboard at `GET /admin`: one page of plain HTML, CSS and JavaScript, embedded in the
//! binary (no build step, no external assets).
//!
//! The page and its two assets are the only `/admin` routes served without the admin token: a
//! browser cannot send a bearer token when it navigates, and the shell holds no data. It asks
//! for the token, keeps it in `sessionStorage` (gone when the tab closes; never in a URL or a
//! cookie, so it is neither logged nor sent by the browser on its own), and fetches everything
//! from `/admin/v1/*` with `Authorization: Bearer`. A strict Content-Security-Policy allows
//! only these same-origin scripts and styles, so nothing injected into the page could run.

use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const PAGE: &str = include_str!("dashboard/dashboard.html");
const SCRIPT: &str = include_str!("dashboard/dashboard.js");
const STYLE: &str = include_str!("dashboard/dashboard.css");

/// Where the page loads its assets from (absolute, as the page names them).
pub const SCRIPT_PATH: &str = "/admin/assets/dashboard.js";
pub const STYLE_PATH: &str = "/admin/assets/dashboard.css";

/// Same-origin scripts, styles and fetches only; no frames, no plugins, no inline code.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The page and its assets, for any router state: merge it next to (not inside) the routes
/// that require the admin token.
pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/admin", get(|| async { page() }))
        .route(SCRIPT_PATH, get(|| async { script() }))
        .route(STYLE_PATH, get(|| async { style() }))
}

/// The dashboard. The page itself holds no data and needs no token (a browser cannot send
/// one when navigating); it asks for the admin token and calls the admin API with it.
#[utoipa::path(
    get,
    path = "/admin",
    tag = "admin",
    operation_id = "dashboard",
    responses(
        (status = 200, description = "The dashboard page",
         body = String, content_type = "text/html"),
    ),
)]
pub fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

/// `GET /admin/assets/dashboard.js`.
pub fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /admin/assets/dashboard.css`.
pub fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // A new binary may ship a new page: always revalidate (the assets are small).
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_assets() {
        assert!(PAGE.contains(SCRIPT_PATH));
        assert!(PAGE.contains(STYLE_PATH));
        for external in ["http://", "https://", "//cdn", "<script>", " style=\""] {
            assert!(!PAGE.contains(external), "the page has `{external}`");
        }
    }

    #[test]
    fn the_token_lives_in_session_storage_only() {
        assert!(SCRIPT.contains("sessionStorage"));
        for forbidden in [
            "localStorage",
            "document.cookie",
            "new EventSource",
            "innerHTML",
        ] {
            assert!(!SCRIPT.contains(forbidden), "the script uses `{forbidden}`");
        }
    }

    #[test]
    fn every_answer_carries_the_security_headers() {
        for response in [page(), script(), style()] {
            let headers = response.headers();
            assert!(headers
                .get(header::CONTENT_SECURITY_POLICY)
                .is_some_and(|v| v.to_str().is_ok_and(|v| v.contains("script-src 'self'"))));
            assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        }
    }
}
