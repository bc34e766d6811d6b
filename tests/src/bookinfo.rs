//! Istio's Bookinfo application as test workloads, written from its documented behaviour:
//! `productpage` calls `details` and then `reviews`; `reviews` v2 and v3 call `ratings`.
//! The endpoints, JSON shapes, HTML markers, propagated headers and built-in timeouts are
//! the ones Istio's traffic-management tasks depend on:
//!
//! - productpage → details: one try, 3 s; → reviews: two tries of 3 s each; the page is
//!   always 200 and shows "Sorry, product reviews are currently unavailable for this book."
//!   when reviews fails; `POST /login` keeps the user in a `session` cookie, and every
//!   backend call then carries `end-user: <user>`.
//! - reviews v1: no ratings; v2: black stars, ratings with a 10 s timeout; v3: red stars,
//!   2.5 s. A failed ratings call gives `"error": "Ratings service is currently
//!   unavailable"` per review. "Reviews served by: <pod>" names the reviews pod.
//! - ratings: Reviewer1 5 stars, Reviewer2 4 (`v-faulty`: every other GET answers 503, as
//!   Istio's faulty ratings image fails half); details: the book's fixed details.
//!
//! Backends are reached at the addresses given (`--backend details=ADDR`), with the
//! service's name in `Host`, one connection per call (as the originals: no pooling).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    hash::{Hash, Hasher},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// The port every Bookinfo service listens on.
pub const PORT: u16 = 9080;

pub const TITLE: &str = "The Comedy of Errors";
pub const REVIEWS_UNAVAILABLE: &str =
    "Sorry, product reviews are currently unavailable for this book.";
pub const DETAILS_UNAVAILABLE: &str =
    "Sorry, product details are currently unavailable for this book.";
pub const RATINGS_UNAVAILABLE: &str = "Ratings service is currently unavailable";
/// One per filled star on the page.
pub const STAR: &str = "glyphicon glyphicon-star\"";

/// Headers reviews (and details) pass on to their backends, Istio's list.
const REVIEWS_PROPAGATE: [&str; 20] = [
    "x-request-id",
    "x-ot-span-context",
    "x-datadog-trace-id",
    "x-datadog-parent-id",
    "x-datadog-sampling-priority",
    "traceparent",
    "tracestate",
    "x-cloud-trace-context",
    "grpc-trace-bin",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "sw8",
    "end-user",
    "user-agent",
    "cookie",
    "authorization",
    "jwt",
];

/// Of those, what productpage does not copy: `end-user` comes from its session, and of
/// the b3 context it passes the trace id, span id and sampled flag only.
const PRODUCTPAGE_OWN: [&str; 3] = ["end-user", "x-b3-parentspanid", "x-b3-flags"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Service {
    Productpage,
    Details,
    Reviews,
    Ratings,
}

/// What one Bookinfo process serves.
#[derive(Debug, Clone)]
pub struct Config {
    pub service: Service,
    /// `v1`, `v2`, `v3` (reviews: no ratings, black stars, red stars).
    pub version: String,
    /// The pod's name (reviews reports it as `podname`).
    pub pod: String,
    /// Where `details`, `reviews` and `ratings` are.
    pub backends: BTreeMap<String, SocketAddr>,
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Serves `config.service` on `[::]:9080` (dual stack) until killed; prints `READY 9080`.
pub fn serve(config: Config) -> Result<Infallible> {
    let listener = crate::workload::bind_dual_stack(PORT)?;
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let config = Arc::new(config);
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        println!("READY {PORT}");
        loop {
            let (stream, _) = listener.accept().await?;
            let config = config.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let config = config.clone();
                    async move { Ok::<_, Infallible>(handle(&config, req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

async fn handle(config: &Config, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path();
    match config.service {
        Service::Details => details(path),
        Service::Ratings => ratings(&config.version, &parts.method, path, &body),
        Service::Reviews => reviews(config, path, &parts.headers).await,
        Service::Productpage => productpage(config, &parts, &body).await,
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn not_found() -> Response<Body> {
    let mut r = Response::new(Empty::new().boxed());
    *r.status_mut() = StatusCode::NOT_FOUND;
    r
}

// --- details -----------------------------------------------------------------------------

fn details(path: &str) -> Response<Body> {
    if path == "/health" {
        return json(
            StatusCode::OK,
            &serde_json::json!({"status": "Details is healthy"}),
        );
    }
    let Some(rest) = path.strip_prefix("/details") else {
        return not_found();
    };
    match rest
        .rsplit('/')
        .next()
        .and_then(|id| id.parse::<i64>().ok())
    {
        Some(id) => json(StatusCode::OK, &book_details(id)),
        None => json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": "please provide numeric product id"}),
        ),
    }
}

fn book_details(id: i64) -> serde_json::Value {
    serde_json::json!({
        "id": id, "author": "William Shakespeare", "year": 1595, "type": "paperback",
        "pages": 200, "publisher": "PublisherA", "language": "English",
        "ISBN-10": "1234567890", "ISBN-13": "123-1234567890"
    })
}

// --- ratings -----------------------------------------------------------------------------

/// GETs of ratings `v-faulty` so far: every other one fails (Istio's image fails half of
/// them at random; alternating keeps the tests' shares exact).
static FAULTY_GETS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn ratings(version: &str, method: &http::Method, path: &str, body: &[u8]) -> Response<Body> {
    if path == "/health" {
        return json(
            StatusCode::OK,
            &serde_json::json!({"status": "Ratings is healthy"}),
        );
    }
    if version == "v-faulty"
        && method == http::Method::GET
        && FAULTY_GETS
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(2)
    {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"error": "Service unavailable"}),
        );
    }
    let Some(rest) = path.strip_prefix("/ratings/") else {
        return not_found();
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let Ok(id) = digits.parse::<i64>() else {
        return json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": "please provide numeric product ID"}),
        );
    };
    if method == http::Method::POST {
        return match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(r) => json(StatusCode::OK, &serde_json::json!({"id": id, "ratings": r})),
            Err(_) => json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": "please provide valid ratings JSON"}),
            ),
        };
    }
    json(
        StatusCode::OK,
        &serde_json::json!({"id": id, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}),
    )
}

// --- reviews -----------------------------------------------------------------------------

const REVIEWS: [(&str, &str); 2] = [
    (
        "Reviewer1",
        "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!",
    ),
    (
        "Reviewer2",
        "Absolutely fun and entertaining. The play lacks thematic depth when compared to other plays by Shakespeare.",
    ),
];

async fn reviews(config: &Config, path: &str, headers: &HeaderMap) -> Response<Body> {
    if path == "/health" {
        return json(
            StatusCode::OK,
            &serde_json::json!({"status": "Reviews is healthy"}),
        );
    }
    let Some(id) = path
        .strip_prefix("/reviews/")
        .filter(|id| id.parse::<i64>().is_ok())
    else {
        return not_found();
    };
    // v1 shows no ratings; v2 black stars, v3 red; the timeout follows the colour.
    let (with_ratings, color) = match config.version.as_str() {
        "v1" => (false, "black"),
        "v2" => (true, "black"),
        _ => (true, "red"),
    };
    let timeout = if color == "black" {
        Duration::from_secs(10)
    } else {
        Duration::from_millis(2500)
    };
    let stars: Option<BTreeMap<String, i64>> = if with_ratings {
        let forwarded = propagate(headers, &REVIEWS_PROPAGATE);
        match call(
            config,
            "ratings",
            &format!("/ratings/{id}"),
            &forwarded,
            timeout,
        )
        .await
        {
            Ok((200, body)) => serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| serde_json::from_value(v["ratings"].clone()).ok()),
            _ => None,
        }
    } else {
        None
    };
    let reviews: Vec<serde_json::Value> = REVIEWS
        .iter()
        .map(|(reviewer, text)| {
            let mut review = serde_json::json!({"reviewer": reviewer, "text": text});
            if with_ratings {
                review["rating"] = match stars.as_ref().and_then(|s| s.get(*reviewer)) {
                    Some(n) => serde_json::json!({"stars": n, "color": color}),
                    None => serde_json::json!({"error": RATINGS_UNAVAILABLE}),
                };
            }
            review
        })
        .collect();
    json(
        StatusCode::OK,
        &serde_json::json!({"id": id, "podname": config.pod, "clustername": "null", "reviews": reviews}),
    )
}

// --- productpage -------------------------------------------------------------------------

/// The per-process key that signs session cookies.
fn session_key() -> u64 {
    static KEY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *KEY.get_or_init(|| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::time::SystemTime::now().hash(&mut h);
        std::process::id().hash(&mut h);
        h.finish()
    })
}

fn sign(user: &str) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    session_key().hash(&mut h);
    user.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// The user of a signed `session` cookie (`<hex user>.<signature>`).
fn session_user(headers: &HeaderMap) -> Option<String> {
    let cookies = headers.get_all(header::COOKIE);
    let value = cookies
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|line| line.split(';'))
        .find_map(|kv| kv.trim().strip_prefix("session="))?;
    let (hex, signature) = value.split_once('.')?;
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    let user = String::from_utf8(bytes?).ok()?;
    (sign(&user) == signature && !user.is_empty()).then_some(user)
}

async fn productpage(config: &Config, parts: &http::request::Parts, body: &[u8]) -> Response<Body> {
    let path = parts.uri.path();
    match (parts.method.as_str(), path) {
        ("GET", "/health") => text(
            StatusCode::OK,
            "text/html; charset=utf-8",
            "Product page is healthy".into(),
        ),
        ("POST", "/login") => {
            let user = form_urlencoded::parse(body)
                .chain(form_urlencoded::parse(
                    parts.uri.query().unwrap_or_default().as_bytes(),
                ))
                .find(|(k, _)| k == "username")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            let hex: String = user.bytes().map(|b| format!("{b:02x}")).collect();
            redirect(
                parts,
                &format!("session={hex}.{}; HttpOnly; Path=/", sign(&user)),
            )
        }
        ("GET", "/logout") => redirect(
            parts,
            "session=; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0; HttpOnly; Path=/",
        ),
        ("GET", "/productpage") => {
            let (user, headers) = outgoing(parts);
            let details = fetch_details(config, &headers).await;
            let reviews = fetch_reviews(config, &headers).await;
            text(
                StatusCode::OK,
                "text/html; charset=utf-8",
                page(user.as_deref(), &details, &reviews),
            )
        }
        ("GET", "/api/v1/products") => json(
            StatusCode::OK,
            &serde_json::json!([{"id": 0, "title": TITLE, "descriptionHtml": DESCRIPTION}]),
        ),
        ("GET", _) if path.starts_with("/api/v1/products/") => {
            let rest = &path["/api/v1/products/".len()..];
            let (_, headers) = outgoing(parts);
            let (status, value) = match rest.split_once('/') {
                None => fetch_details(config, &headers).await,
                Some((_, "reviews")) => fetch_reviews(config, &headers).await,
                Some((id, "ratings")) => {
                    one_call(
                        config,
                        "ratings",
                        &format!("/ratings/{id}"),
                        &headers,
                        "Sorry, product ratings are currently unavailable for this book.",
                    )
                    .await
                }
                Some(_) => return not_found(),
            };
            json(
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                &value,
            )
        }
        ("GET", p) if p.starts_with("/static/") => {
            text(StatusCode::OK, "text/css", "/* bookinfo */\n".into())
        }
        _ => not_found(),
    }
}

const DESCRIPTION: &str = "<a href=\"https://en.wikipedia.org/wiki/The_Comedy_of_Errors\">Wikipedia Summary</a>: The Comedy of Errors is one of <b>William Shakespeare's</b> early plays. It is his shortest and one of his most farcical comedies, with a major part of the humour coming from slapstick and mistaken identity, in addition to puns and word play.";

/// 302 to the Referer (else the product page), setting `cookie`.
fn redirect(parts: &http::request::Parts, cookie: &str) -> Response<Body> {
    let to = parts
        .headers
        .get(header::REFERER)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("/productpage"));
    let mut r = Response::new(Empty::new().boxed());
    *r.status_mut() = StatusCode::FOUND;
    r.headers_mut().insert(header::LOCATION, to);
    r.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("Cookie"));
    if let Ok(v) = HeaderValue::from_str(cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// The logged-in user, and the headers every backend call carries.
fn outgoing(parts: &http::request::Parts) -> (Option<String>, HeaderMap) {
    let user = session_user(&parts.headers);
    let copied: Vec<&str> = REVIEWS_PROPAGATE
        .into_iter()
        .filter(|h| !PRODUCTPAGE_OWN.contains(h))
        .collect();
    let mut headers = propagate(&parts.headers, &copied);
    if let Some(u) = &user
        && let Ok(v) = HeaderValue::from_str(u)
    {
        headers.insert("end-user", v);
    }
    (user, headers)
}

fn propagate(from: &HeaderMap, names: &[&str]) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in names {
        for v in from.get_all(*name) {
            if let Ok(n) = header::HeaderName::from_bytes(name.as_bytes()) {
                out.append(n, v.clone());
            }
        }
    }
    out
}

async fn fetch_details(config: &Config, headers: &HeaderMap) -> (u16, serde_json::Value) {
    one_call(
        config,
        "details",
        "/details/0",
        headers,
        DETAILS_UNAVAILABLE,
    )
    .await
}

/// Reviews: two tries of 3 s each, as productpage makes them.
async fn fetch_reviews(config: &Config, headers: &HeaderMap) -> (u16, serde_json::Value) {
    let mut status = 500;
    for _ in 0..2 {
        match call(
            config,
            "reviews",
            "/reviews/0",
            headers,
            Duration::from_secs(3),
        )
        .await
        {
            Ok((200, body)) => {
                if let Ok(v) = serde_json::from_slice(&body) {
                    return (200, v);
                }
            }
            Ok((s, _)) => status = s,
            Err(_) => status = 500,
        }
    }
    (status, serde_json::json!({"error": REVIEWS_UNAVAILABLE}))
}

async fn one_call(
    config: &Config,
    service: &str,
    path: &str,
    headers: &HeaderMap,
    error: &str,
) -> (u16, serde_json::Value) {
    match call(config, service, path, headers, Duration::from_secs(3)).await {
        Ok((200, body)) => match serde_json::from_slice(&body) {
            Ok(v) => (200, v),
            Err(_) => (500, serde_json::json!({"error": error})),
        },
        Ok((s, _)) => (s, serde_json::json!({"error": error})),
        Err(_) => (500, serde_json::json!({"error": error})),
    }
}

/// `GET path` on `service` (a new connection, `Host: service:9080`), within `timeout`.
async fn call(
    config: &Config,
    service: &str,
    path: &str,
    headers: &HeaderMap,
    timeout: Duration,
) -> Result<(u16, Bytes)> {
    let Some(addr) = config.backends.get(service).copied() else {
        bail!("no address for {service}");
    };
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {service} at {addr}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let mut req = Request::get(path).body(Empty::<Bytes>::new())?;
        *req.headers_mut() = headers.clone();
        req.headers_mut().insert(
            header::HOST,
            HeaderValue::from_str(&format!("{service}:{PORT}"))?,
        );
        req.headers_mut()
            .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let response = sender.send_request(req).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .with_context(|| format!("{service} did not answer within {timeout:?}"))?
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&#34;")
}

/// The product page's HTML, with the markers of Istio's page.
fn page(
    user: Option<&str>,
    details: &(u16, serde_json::Value),
    reviews: &(u16, serde_json::Value),
) -> String {
    let mut html = String::from(
        "<!DOCTYPE html>\n<html>\n<head><title>Simple Bookstore App</title></head>\n<body>\n<nav>BookInfo Sample ",
    );
    match user {
        Some(u) => html.push_str(&format!(
            "<p class=\"text-base font-medium text-gray-50\">{}</p> <a href=\"logout\">Sign out</a>",
            escape(u)
        )),
        None => html.push_str("<button id=\"sign-in-button\">Sign in</button>"),
    }
    html.push_str(&format!(
        "</nav>\n<h1 class=\"text-5xl font-bold tracking-tight text-blue-900\">{TITLE}</h1>\n<p class=\"mt-6 text-xl leading-8 text-gray-600\">{DESCRIPTION}</p>\n"
    ));
    let (status, d) = details;
    if *status == 200 {
        html.push_str(&format!(
            "<h4 class=\"text-3xl font-semibold\">Book Details</h4>\n<table><tr><th>ISBN-10</th><th>Publisher</th><th>Pages</th><th>Type</th><th>Language</th></tr>\n<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>\n",
            escape(d["ISBN-10"].as_str().unwrap_or_default()),
            escape(d["publisher"].as_str().unwrap_or_default()),
            d["pages"],
            escape(d["type"].as_str().unwrap_or_default()),
            escape(d["language"].as_str().unwrap_or_default()),
        ));
    } else {
        html.push_str(&format!(
            "<p class=\"text-2xl text-red-500\">Error fetching product details</p>\n<p class=\"text-lg text-gray-600\">{DETAILS_UNAVAILABLE}</p>\n"
        ));
    }
    let (status, r) = reviews;
    if *status == 200 {
        html.push_str("<h4 class=\"text-3xl font-semibold\">Book Reviews</h4>\n");
        let pod = r["podname"].as_str().unwrap_or_default();
        for review in r["reviews"].as_array().into_iter().flatten() {
            html.push_str("<section>\n");
            let rating = &review["rating"];
            if rating.get("error").is_some() {
                html.push_str(&format!(
                    "<p class=\"text-red-500\">{RATINGS_UNAVAILABLE}</p>\n"
                ));
            } else if let Some(stars) = rating["stars"].as_u64().filter(|s| *s > 0) {
                let color = rating["color"].as_str().unwrap_or("black");
                html.push_str(&format!(
                    "<div class=\"flex gap-x-1 text-{color}-500\"><font color=\"{color}\">"
                ));
                for _ in 0..stars.min(5) {
                    html.push_str(
                        "<svg id=\"glyphicon glyphicon-star\" class=\"h-5 w-5 flex-none\"></svg>",
                    );
                }
                for _ in stars.min(5)..5 {
                    html.push_str("<svg class=\"h-5 w-5 flex-none\" fill=\"none\"></svg>");
                }
                html.push_str("</font></div>\n");
            }
            html.push_str(&format!(
                "<blockquote><p>\"{}\"</p></blockquote>\n<div class=\"font-semibold text-gray-900\">{}</div>\n<div class=\"mt-0.5 text-gray-600 font-mono\">Reviews served by:\n  {}\n</div>\n</section>\n",
                escape(review["text"].as_str().unwrap_or_default()),
                escape(review["reviewer"].as_str().unwrap_or_default()),
                escape(pod),
            ));
        }
    } else {
        html.push_str(&format!(
            "<p class=\"text-2xl text-red-500\">Error fetching product reviews</p>\n<p class=\"text-lg text-gray-600\">{REVIEWS_UNAVAILABLE}</p>\n"
        ));
    }
    html.push_str("</body>\n</html>\n");
    html
}

/// What a product page shows, as the tasks check it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Which reviews version answered: `v1` (no stars), `v2` (black), `v3` (red), or
    /// `unavailable` (the reviews error).
    pub reviews: String,
    /// The reviews pod named under "Reviews served by:".
    pub served_by: Option<String>,
    pub ratings_unavailable: bool,
    pub details: bool,
    pub user: Option<String>,
}

/// Reads a product page.
pub fn read_page(html: &str) -> Seen {
    let served_by = html.split("Reviews served by:\n").nth(1).map(|rest| {
        rest.trim_start()
            .split(|c: char| c.is_whitespace() || c == '<')
            .next()
            .unwrap_or_default()
            .to_owned()
    });
    let reviews = if html.contains(REVIEWS_UNAVAILABLE) {
        "unavailable"
    } else if html.contains("<font color=\"red\">") {
        "v3"
    } else if html.contains("<font color=\"black\">") {
        "v2"
    } else if html.contains(RATINGS_UNAVAILABLE) {
        // Ratings failed: v2 or v3, told by the pod.
        match served_by.as_deref() {
            Some(p) if p.contains("v3") => "v3",
            _ => "v2",
        }
    } else {
        "v1"
    };
    let user = html
        .split("<p class=\"text-base font-medium text-gray-50\">")
        .nth(1)
        .and_then(|rest| rest.split("</p>").next())
        .map(str::to_owned);
    Seen {
        reviews: reviews.to_owned(),
        served_by,
        ratings_unavailable: html.contains(RATINGS_UNAVAILABLE),
        details: html.contains("Book Details"),
        user,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review(stars: Option<i64>, color: &str) -> serde_json::Value {
        let rating = match stars {
            Some(n) => serde_json::json!({"stars": n, "color": color}),
            None => serde_json::json!({"error": RATINGS_UNAVAILABLE}),
        };
        serde_json::json!({"podname": "reviews-v3-abc", "reviews": [
            {"reviewer": "Reviewer1", "text": "a", "rating": rating.clone()},
            {"reviewer": "Reviewer2", "text": "b", "rating": rating}]})
    }

    #[test]
    fn pages_carry_istios_markers_and_read_back() {
        let details = (200, book_details(0));
        let v3 = page(Some("jason"), &details, &(200, review(Some(5), "red")));
        assert_eq!(v3.matches(STAR).count(), 10);
        assert!(v3.contains(TITLE) && v3.contains("PublisherA"));
        let seen = read_page(&v3);
        assert_eq!(seen.reviews, "v3");
        assert_eq!(seen.served_by.as_deref(), Some("reviews-v3-abc"));
        assert_eq!(seen.user.as_deref(), Some("jason"));
        let v1 = page(
            None,
            &details,
            &(
                200,
                serde_json::json!({"podname": "reviews-v1-x", "reviews": [{"reviewer": "R", "text": "t"}]}),
            ),
        );
        assert!(!v1.contains(STAR));
        assert_eq!(read_page(&v1).reviews, "v1");
        let down = page(
            None,
            &(500, serde_json::json!({})),
            &(500, serde_json::json!({})),
        );
        let seen = read_page(&down);
        assert_eq!(
            (seen.reviews.as_str(), seen.details),
            ("unavailable", false)
        );
        let no_ratings = read_page(&page(None, &details, &(200, review(None, ""))));
        assert!(no_ratings.ratings_unavailable);
        assert_eq!(no_ratings.reviews, "v3");
    }

    #[test]
    fn sessions_are_signed() {
        let mut headers = HeaderMap::new();
        let hex: String = "jason".bytes().map(|b| format!("{b:02x}")).collect();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=b; session={hex}.{}", sign("jason"))).unwrap(),
        );
        assert_eq!(session_user(&headers).as_deref(), Some("jason"));
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("session={hex}.0000000000000000")).unwrap(),
        );
        assert_eq!(session_user(&headers), None);
    }
}
