//! The web console under `/console/`: static files embedded in the binary, served with a strict
//! Content-Security-Policy.
//!
//! The console is plain HTML, CSS and JavaScript in `src/api/console/` (no build step, nothing
//! fetched from elsewhere). It holds no secret: the page asks the operator for the admin token and
//! keeps it in the tab's session storage, then calls the control plane like any other client. So
//! these routes need no token, and the API itself is unchanged.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use hyper::http::request::Parts;
use hyper::{Method, Response, StatusCode};

use super::{only, ApiError, Resp};

/// The policy every console file is served with: scripts, styles, images and API calls from this
/// origin only; no inline script or style, no `eval`, no plugins, no `<base>`, no form
/// submissions (every form is handled by script, so a page whose script failed cannot send the
/// token field anywhere), and no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    body: &'static [u8],
    content_type: &'static str,
}

const INDEX: Asset = Asset {
    body: include_bytes!("console/index.html"),
    content_type: "text/html; charset=utf-8",
};
const SCRIPT: Asset = Asset {
    body: include_bytes!("console/console.js"),
    content_type: "text/javascript; charset=utf-8",
};
const STYLE: Asset = Asset {
    body: include_bytes!("console/console.css"),
    content_type: "text/css; charset=utf-8",
};
const ICON: Asset = Asset {
    body: include_bytes!("console/favicon.svg"),
    content_type: "image/svg+xml",
};

/// The budget for the whole console: every file together stays under 100 KB.
const PAGE_BYTES_MAX: usize = 100 * 1024;
const _: () = assert!(
    INDEX.body.len() + SCRIPT.body.len() + STYLE.body.len() + ICON.body.len() < PAGE_BYTES_MAX
);

/// Routes `/console` and everything below it.
pub(super) async fn route(parts: &Parts) -> Result<Resp, ApiError> {
    let method = &parts.method;
    match parts.uri.path() {
        "/console" => only(method, &Method::GET, redirect(parts)).await,
        "/console/" | "/console/index.html" => only(method, &Method::GET, serve(&INDEX)).await,
        "/console/console.js" => only(method, &Method::GET, serve(&SCRIPT)).await,
        "/console/console.css" => only(method, &Method::GET, serve(&STYLE)).await,
        "/console/favicon.svg" => only(method, &Method::GET, serve(&ICON)).await,
        _ => Err(ApiError::not_found()),
    }
}

/// `/console` → `/console/`, keeping the query (`?org=acme`), so that the page's relative
/// world starts at the folder.
async fn redirect(parts: &Parts) -> Result<Resp, ApiError> {
    let location = match parts.uri.query() {
        Some(q) => format!("/console/?{q}"),
        None => "/console/".to_string(),
    };
    let location = HeaderValue::from_str(&location)
        .map_err(|_| ApiError::invalid("the query string is not a valid header value"))?;
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    response.headers_mut().insert(LOCATION, location);
    Ok(response)
}

async fn serve(asset: &'static Asset) -> Result<Resp, ApiError> {
    let mut response = Response::new(Full::new(Bytes::from_static(asset.body)));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    headers.insert(
        HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("x-frame-options", "DENY"),
        ("cross-origin-opener-policy", "same-origin"),
    ] {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    // The files change with the binary: revalidate every time (they are small).
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_no_inline_script_or_style() {
        let html = std::str::from_utf8(INDEX.body).expect("utf-8");
        assert!(!html.contains("style="), "inline style attribute");
        assert!(!html.contains("<style"), "inline <style>");
        for (i, _) in html.match_indices(" on") {
            let name: String = html[i + 3..]
                .chars()
                .take_while(char::is_ascii_lowercase)
                .collect();
            let after = &html[i + 3 + name.len()..];
            assert!(!after.starts_with('='), "inline event handler on{name}");
        }
        for (i, _) in html.match_indices("<script") {
            let tag = &html[i..i + html[i..].find('>').expect("tag end")];
            assert!(tag.contains("src=\"/console/"), "inline script: {tag}");
            assert!(html[i..].starts_with(&format!("{tag}></script>")));
        }
    }
}
