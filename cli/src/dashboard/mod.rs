//! `bizq dashboard`: the web dashboard (axum, server-rendered with maud): overview,
//! workspaces, tasks, workers, and retry/cancel actions recorded as admin events. Loopback
//! by default; any other address needs a token. Without a token it answers only requests
//! addressed to a loopback name (`Host`), so a DNS-rebinding page cannot use it.

mod actions;
mod data;
mod pages;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bizq::Config;
use clap::Args;
use sqlx::PgPool;
use subtle::ConstantTimeEq;

/// `bizq dashboard`.
#[derive(Args, Debug)]
pub struct DashboardArgs {
    /// Address to listen on (default: ops.dashboard_addr, 127.0.0.1:8080). Anything but a
    /// loopback address needs a token: $BIZQ_DASHBOARD_TOKEN or ops.dashboard_token_file.
    #[arg(long)]
    addr: Option<String>,
    /// Who is recorded as the actor of retries and cancels (default: $USER@host).
    #[arg(long)]
    actor: Option<String>,
    /// A file holding the access token (overrides ops.dashboard_token_file).
    #[arg(long)]
    token_file: Option<PathBuf>,
}

/// Shared by every request.
pub struct App {
    pub pool: PgPool,
    pub config: Config,
    /// Required on every request when set (always set beyond loopback).
    token: Option<String>,
    /// Every form carries it; a POST without it is refused.
    pub csrf: String,
    pub actor: String,
}

pub type Shared = Arc<App>;

/// The token from the token file (flag, then config) or `$BIZQ_DASHBOARD_TOKEN`.
fn read_token(args: &DashboardArgs, config: &Config) -> anyhow::Result<Option<String>> {
    let file = args
        .token_file
        .clone()
        .or_else(|| config.ops.dashboard_token_file.clone());
    let token = match file {
        Some(path) => Some(
            std::fs::read_to_string(&path)
                .with_context(|| format!("reading the dashboard token file {}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("BIZQ_DASHBOARD_TOKEN").ok(),
    };
    match token {
        Some(t) if t.trim().is_empty() => bail!("the dashboard token is empty"),
        Some(t) if t.trim().len() < 16 => {
            bail!("the dashboard token must be at least 16 characters")
        }
        Some(t) => Ok(Some(t.trim().to_string())),
        None => Ok(None),
    }
}

/// Runs the dashboard until SIGTERM/SIGINT. Prints the URL it serves on its first line.
pub async fn run(pool: PgPool, config: Config, args: DashboardArgs) -> anyhow::Result<()> {
    let addr = args
        .addr
        .clone()
        .unwrap_or_else(|| config.ops.dashboard_addr.clone());
    let token = read_token(&args, &config)?;
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let bound: SocketAddr = listener.local_addr()?;
    if !is_loopback(bound.ip()) && token.is_none() {
        bail!(
            "the dashboard listens on {bound}, beyond loopback: set $BIZQ_DASHBOARD_TOKEN or \
             ops.dashboard_token_file (or listen on 127.0.0.1)"
        );
    }
    let actor = args.actor.clone().unwrap_or_else(|| {
        let user = std::env::var("USER").unwrap_or_else(|_| "admin".into());
        format!("{user}@{}", bizq::registry::host_name())
    });
    let app = Arc::new(App {
        pool,
        config,
        token,
        csrf: uuid::Uuid::new_v4().simple().to_string(),
        actor,
    });
    let router = router(app.clone());
    println!("bizq dashboard on http://{bound}/");
    let shutdown = bizq::signals::shutdown_token();
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
    .context("serving the dashboard")?;
    Ok(())
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v| v.is_loopback()),
    }
}

fn router(app: Shared) -> Router {
    Router::new()
        .route("/", get(pages::overview))
        .route("/workspaces", get(pages::workspaces))
        .route("/workers", get(pages::workers))
        .route("/tasks", get(pages::tasks))
        .route(
            "/tasks/bulk",
            get(actions::confirm_bulk).post(actions::bulk),
        )
        .route("/tasks/{id}", get(pages::task))
        .route("/tasks/{id}/retry", post(actions::retry_one))
        .route("/tasks/{id}/cancel", post(actions::cancel_one))
        .route("/login", get(pages::login).post(login))
        .route("/static/dashboard.js", get(script))
        .route("/static/dashboard.css", get(style))
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// The cookie that carries the token after `/login`.
const COOKIE: &str = "bizq_dashboard";

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Constant-time comparison, whatever the lengths.
pub fn same_secret(given: &str, expected: &str) -> bool {
    given.len() == expected.len() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

/// Whether the request presents the token: `Authorization: Bearer …` or the login cookie.
fn authorized(app: &App, headers: &HeaderMap) -> bool {
    let Some(expected) = &app.token else {
        return true;
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    [bearer, cookie(headers, COOKIE)]
        .into_iter()
        .flatten()
        .any(|given| same_secret(given.trim(), expected))
}

/// Every request: without a token, a loopback `Host` (DNS rebinding); the token when one is
/// configured (the login page and its POST excepted), and for POSTs a same-origin `Origin`
/// when the browser sends one. The CSRF token itself is checked by each form handler. Every
/// response forbids framing and caching.
async fn guard(State(app): State<Shared>, req: Request, next: Next) -> Response {
    if app.token.is_none() && !loopback_host(&req) {
        return secure_headers(
            (
                StatusCode::MISDIRECTED_REQUEST,
                "this dashboard answers only to localhost, 127.0.0.1 or [::1] (it has no \
                 token); set $BIZQ_DASHBOARD_TOKEN to serve other names\n",
            )
                .into_response(),
        );
    }
    let path = req.uri().path().to_string();
    let public = path == "/login" || path.starts_with("/static/");
    if !public && !authorized(&app, req.headers()) {
        let mut r = pages::login_page(&app, Some("a token is required")).into_response();
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        return secure_headers(r);
    }
    if req.method() == Method::POST && !same_origin(req.headers()) {
        return secure_headers(
            (StatusCode::FORBIDDEN, "cross-origin POST refused\n").into_response(),
        );
    }
    secure_headers(next.run(req).await)
}

/// Whether the request names this machine by a loopback name: `localhost`, `127.0.0.1` or
/// `[::1]`, any port, from `Host` (or the request's authority, for HTTP/2). Without a token
/// this is what keeps a DNS-rebinding page out: its requests reach the loopback listener but
/// carry the attacker's host name. A request without a host is refused too.
fn loopback_host(req: &Request) -> bool {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_string()));
    host.is_some_and(|h| is_loopback_host(&h))
}

/// `host[:port]` is `localhost`, `127.0.0.1` or `[::1]` (case-insensitive), with a numeric
/// port or none.
fn is_loopback_host(value: &str) -> bool {
    let value = value.trim().to_ascii_lowercase();
    let (name, port) = if value.starts_with('[') {
        match value.find(']') {
            Some(end) => value.split_at(end + 1),
            None => return false,
        }
    } else {
        match value.find(':') {
            Some(i) => value.split_at(i),
            None => (value.as_str(), ""),
        }
    };
    let port_ok = match port.strip_prefix(':') {
        None => port.is_empty(),
        Some(p) => !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()),
    };
    port_ok && matches!(name, "localhost" | "127.0.0.1" | "[::1]")
}

fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    origin
        .split_once("://")
        .is_some_and(|(_, rest)| rest.trim_end_matches('/') == host)
}

fn secure_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    // Only this origin's script and style; no inline script can run, even if some output
    // escaped the templates.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             frame-ancestors 'none'; form-action 'self'",
        ),
    );
    r
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(app): State<Shared>, axum::Form(f): axum::Form<LoginForm>) -> Response {
    match &app.token {
        Some(expected) if same_secret(f.token.trim(), expected) => {
            let cookie = format!(
                "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
                f.token.trim()
            );
            (
                StatusCode::SEE_OTHER,
                [(header::SET_COOKIE, cookie), (header::LOCATION, "/".into())],
            )
                .into_response()
        }
        Some(_) => {
            let mut r = pages::login_page(&app, Some("wrong token")).into_response();
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            r
        }
        None => (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response(),
    }
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/dashboard.js"),
    )
        .into_response()
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/dashboard.css"),
    )
        .into_response()
}

/// A page-level error: logged, and shown without internals.
pub struct PageError(anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for PageError {
    fn from(e: E) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        tracing::warn!(error = %format!("{:#}", self.0), "dashboard request failed");
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the dashboard could not load this page; see its log\n",
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::is_loopback_host;

    #[test]
    fn loopback_hosts_are_the_three_names_with_any_port() {
        for ok in [
            "localhost",
            "LocalHost:8080",
            "127.0.0.1",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:65535",
        ] {
            assert!(is_loopback_host(ok), "{ok} refused");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.nip.io:8080",
            "localhost:",
            "localhost:80:80",
            "localhost:http",
            "[::1]x",
            "[::1",
            "127.0.0.2:8080",
            "0.0.0.0:8080",
            "user@localhost",
        ] {
            assert!(!is_loopback_host(bad), "{bad} accepted");
        }
    }
}
