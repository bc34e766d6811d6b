//! Request mirroring (VirtualService `mirror`/`mirrors`, HTTPRoute `RequestMirror`): a copy
//! of a share of the requests goes to another destination, fire and forget, with the
//! `Host`/`:authority` suffixed `-shadow` as Envoy does (`reviews:9080` →
//! `reviews-shadow:9080`). The copy leaves once the client's body has arrived, and only if
//! it fits the replay buffer; its answer is read and dropped, and nothing about it — a
//! failure, a slow or missing destination — reaches the caller.

use std::{sync::Arc, time::Duration};

use http::{HeaderValue, Request, header};
use http_body_util::{BodyExt, Full};

use super::{
    Waypoint,
    forward::{Hbone, Head, Transport},
    replay::Replay,
    upstream::Connection,
};
use crate::{l7::routes::Mirror, state::MeshState};

/// How long a copy waits for the client's body before it gives up.
const BODY_WAIT: Duration = Duration::from_secs(10);
/// How long a copy may take in all.
const COPY_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends a copy of the request to `mirror` in the background, if the request is in its
/// share. `port` is the service port the request came to.
pub fn spawn(
    wp: &Arc<Waypoint>,
    state: &Arc<MeshState>,
    mirror: &Mirror,
    head: &Head,
    port: u16,
    replay: &Replay,
) {
    if !mirror.share.hits(fastrand::f64()) {
        return;
    }
    let (wp, state, mirror, replay) = (wp.clone(), state.clone(), mirror.clone(), replay.clone());
    let mut copy = Head {
        method: head.method.clone(),
        uri: head.uri.clone(),
        version: head.version,
        headers: head.headers.clone(),
    };
    shadow_authority(&mut copy);
    tokio::spawn(async move {
        let sent =
            tokio::time::timeout(COPY_TIMEOUT, send(&wp, &state, &mirror, copy, port, replay))
                .await
                .unwrap_or(Err("timed out"));
        if let Err(why) = sent {
            tracing::debug!(why, namespace = %mirror.namespace, name = %mirror.name, "waypoint: mirrored request dropped");
        }
    });
}

async fn send(
    wp: &Waypoint,
    state: &MeshState,
    mirror: &Mirror,
    head: Head,
    port: u16,
    replay: Replay,
) -> Result<(), &'static str> {
    let (body, trailers) = replay
        .complete(BODY_WAIT)
        .await
        .ok_or("the body is larger than the replay buffer, or did not arrive")?;
    let svc = state
        .service(&mirror.namespace, &mirror.name)
        .ok_or("no such service")?;
    let wanted = mirror.port.unwrap_or(port);
    let svc_port = svc
        .ports
        .iter()
        .find(|p| p.port == wanted && p.protocol == "TCP")
        .ok_or("no such service port")?;
    let (candidates, destination) =
        super::request::endpoints(state, svc, svc_port, mirror.subset.as_deref())
            .map_err(|(_, _, why)| why)?;
    let policy = destination.map(|d| d.policy(mirror.subset.as_deref()));
    let lb = policy.map(|p| p.lb.clone()).unwrap_or_default();
    let transport = Hbone {
        wp,
        state,
        source: std::net::IpAddr::from([0, 0, 0, 0]),
    };
    let endpoint = transport.choose(&candidates, &lb, &head);
    let body = Full::new(body).map_err(|never| match never {});
    let body = match trailers {
        Some(t) => body.with_trailers(async move { Some(Ok(t)) }).boxed(),
        None => body.boxed(),
    };
    let mut req = Request::new(body);
    *req.method_mut() = head.method;
    *req.uri_mut() = head.uri;
    *req.version_mut() = head.version;
    *req.headers_mut() = head.headers;
    let connection = Connection::new(
        head.version == http::Version::HTTP_2,
        policy.and_then(|p| p.pool.as_ref()),
    );
    let _active = transport.start(endpoint);
    let response = transport
        .send(endpoint, &connection, req)
        .await
        .map_err(|_| "the mirror destination failed")?;
    // Read to the end, so an HTTP/1.1 connection can be reused.
    let _ = response.into_body().collect().await;
    Ok(())
}

/// `host[:port]` → `host-shadow[:port]`.
fn shadow(authority: &str) -> String {
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p))
            if !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (!h.contains(':') || h.ends_with(']')) =>
        {
            (h, Some(p))
        }
        _ => (authority, None),
    };
    match port {
        Some(p) => format!("{host}-shadow:{p}"),
        None => format!("{host}-shadow"),
    }
}

/// The `Host` header and an absolute URI's authority, shadowed.
fn shadow_authority(head: &mut Head) {
    if let Some(v) = head
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|host| HeaderValue::from_str(&shadow(host)).ok())
    {
        head.headers.insert(header::HOST, v);
    }
    if let Some(authority) = head.uri.authority().map(|a| shadow(a.as_str())) {
        let mut parts = head.uri.clone().into_parts();
        if let Ok(a) = authority.parse() {
            parts.authority = Some(a);
            if let Ok(uri) = http::Uri::from_parts(parts) {
                head.uri = uri;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authority_is_shadowed_before_its_port() {
        assert_eq!(shadow("reviews:9080"), "reviews-shadow:9080");
        assert_eq!(shadow("reviews"), "reviews-shadow");
        assert_eq!(shadow("10.96.0.1:80"), "10.96.0.1-shadow:80");
        assert_eq!(shadow("[fd00::1]:80"), "[fd00::1]-shadow:80");
        let mut head = Head {
            method: http::Method::GET,
            uri: "http://echo:80/x?y=1".parse().unwrap(),
            version: http::Version::HTTP_2,
            headers: http::HeaderMap::new(),
        };
        shadow_authority(&mut head);
        assert_eq!(head.uri, "http://echo-shadow:80/x?y=1");
    }
}
