//! The waypoint's access log: one line per request on stdout (the process's log stays on
//! stderr), in Istio's default text format or in its JSON encoding (`--access-log-format
//! json`, Istio's `accessLogEncoding: JSON`), with the same fields under the same names.
//!
//! Lines are buffered and written every second, or as soon as 64 KiB have accumulated, as
//! Envoy's file sink does: a busy waypoint makes one `write(2)` per batch, not one per
//! request. Fields Envoy has and this proxy does not (`x-forwarded-for` aside, which is the
//! request's) are written as `-`.

use std::{
    io::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

/// How the lines are encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Istio's default text format (Envoy's `%START_TIME%` ... `%ROUTE_NAME%`).
    #[default]
    Text,
    /// One JSON object per line, with the keys of Istio's JSON encoding.
    Json,
    /// No access log.
    Off,
}

/// Bytes held before a write that cannot wait for the next tick.
const FLUSH_AT: usize = 64 * 1024;
/// How often buffered lines are written.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// One request, as logged.
#[derive(Debug)]
pub struct Entry<'a> {
    pub start: SystemTime,
    pub method: &'a str,
    pub path: &'a str,
    /// `HTTP/1.1`, `HTTP/2`.
    pub protocol: &'a str,
    pub response_code: u16,
    pub response_flags: &'a str,
    /// `via_upstream` when the upstream answered, else why the waypoint did.
    pub response_code_details: &'a str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
    pub x_forwarded_for: &'a str,
    pub user_agent: &'a str,
    pub request_id: &'a str,
    pub authority: &'a str,
    pub upstream_host: Option<SocketAddr>,
    /// The backend service's name (`name.namespace.svc.cluster.local`).
    pub upstream_cluster: &'a str,
    /// The tunnel's `CONNECT` authority: where the client was going.
    pub downstream_local_address: SocketAddr,
    pub downstream_remote_address: SocketAddr,
    /// The route rule that matched, or the policy that denied.
    pub route_name: &'a str,
    /// The client's SPIFFE identity.
    pub downstream_peer_identity: &'a str,
    /// The AUDIT policy that matched the request.
    pub audit: Option<&'a str>,
}

/// The access log of one waypoint process.
pub struct AccessLog {
    format: Format,
    buffer: Mutex<Vec<u8>>,
}

impl AccessLog {
    /// A log in `format`; call [`spawn_flusher`](Self::spawn_flusher) from a runtime.
    pub fn new(format: Format) -> Arc<Self> {
        Arc::new(Self {
            format,
            buffer: Mutex::new(Vec::with_capacity(FLUSH_AT)),
        })
    }

    /// Writes buffered lines every second until the process ends.
    pub fn spawn_flusher(self: &Arc<Self>) {
        if self.format == Format::Off {
            return;
        }
        let log = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match log.upgrade() {
                    Some(log) => log.flush(),
                    None => return,
                }
            }
        });
    }

    /// Adds one request's line.
    pub fn log(&self, entry: &Entry<'_>) {
        let mut line = Vec::with_capacity(512);
        match self.format {
            Format::Off => return,
            Format::Text => text(&mut line, entry),
            Format::Json => json(&mut line, entry),
        }
        line.push(b'\n');
        let full = {
            let mut buffer = self.buffer.lock().expect("access log lock");
            buffer.extend_from_slice(&line);
            (buffer.len() >= FLUSH_AT).then(|| std::mem::take(&mut *buffer))
        };
        if let Some(bytes) = full {
            write_out(&bytes);
        }
    }

    /// Writes what is buffered now.
    pub fn flush(&self) {
        let bytes = std::mem::take(&mut *self.buffer.lock().expect("access log lock"));
        if !bytes.is_empty() {
            write_out(&bytes);
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.flush();
    }
}

fn write_out(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    // A closed stdout loses the log, never the request.
    let _ = out.write_all(bytes).and_then(|()| out.flush());
}

fn dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// Istio's default text format:
/// `[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%"
/// %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS%
/// "%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION%
/// %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%"
/// "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW%
/// %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS%
/// %REQUESTED_SERVER_NAME% %ROUTE_NAME%`, then the peer's identity and any audit.
fn text(out: &mut Vec<u8>, e: &Entry<'_>) {
    let upstream = e.upstream_host.map(|u| u.to_string());
    let _ = write!(
        out,
        "[{}] \"{} {} {}\" {} {} {} - \"-\" {} {} {} - \"{}\" \"{}\" \"{}\" \"{}\" \"{}\" {} - {} {} - {} identity={}",
        timestamp(e.start),
        e.method,
        e.path,
        e.protocol,
        e.response_code,
        e.response_flags,
        dash(e.response_code_details),
        e.bytes_received,
        e.bytes_sent,
        e.duration.as_millis(),
        dash(e.x_forwarded_for),
        dash(e.user_agent),
        dash(e.request_id),
        dash(e.authority),
        upstream.as_deref().unwrap_or("-"),
        dash(e.upstream_cluster),
        e.downstream_local_address,
        e.downstream_remote_address,
        dash(e.route_name),
        dash(e.downstream_peer_identity),
    );
    if let Some(policy) = e.audit {
        let _ = write!(out, " audit={policy}");
    }
}

/// Istio's JSON encoding: its default format's fields, under its key names.
fn json(out: &mut Vec<u8>, e: &Entry<'_>) {
    let or_null = |s: &str| {
        if s.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::Value::from(s)
        }
    };
    let mut object = serde_json::json!({
        "start_time": timestamp(e.start),
        "method": e.method,
        "path": e.path,
        "protocol": e.protocol,
        "response_code": e.response_code,
        "response_flags": e.response_flags,
        "response_code_details": or_null(e.response_code_details),
        "connection_termination_details": null,
        "upstream_transport_failure_reason": null,
        "bytes_received": e.bytes_received,
        "bytes_sent": e.bytes_sent,
        "duration": e.duration.as_millis() as u64,
        "upstream_service_time": null,
        "x_forwarded_for": or_null(e.x_forwarded_for),
        "user_agent": or_null(e.user_agent),
        "request_id": or_null(e.request_id),
        "authority": or_null(e.authority),
        "upstream_host": e.upstream_host.map(|u| u.to_string()),
        "upstream_cluster": or_null(e.upstream_cluster),
        "upstream_local_address": null,
        "downstream_local_address": e.downstream_local_address.to_string(),
        "downstream_remote_address": e.downstream_remote_address.to_string(),
        "requested_server_name": null,
        "route_name": or_null(e.route_name),
        "downstream_peer_identity": or_null(e.downstream_peer_identity),
    });
    if let Some(policy) = e.audit {
        object["audit_policy"] = policy.into();
    }
    let _ = serde_json::to_writer(out, &object);
}

/// As Envoy writes `%START_TIME%`: `2026-12-02T09:51:35.692Z`.
pub fn timestamp(at: SystemTime) -> String {
    let now = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            start: std::time::UNIX_EPOCH + Duration::from_millis(1_764_668_295_692),
            method: "GET",
            path: "/reviews/0",
            protocol: "HTTP/1.1",
            response_code: 200,
            response_flags: "-",
            response_code_details: "via_upstream",
            bytes_received: 0,
            bytes_sent: 358,
            duration: Duration::from_millis(4),
            x_forwarded_for: "",
            user_agent: "curl/8.5.0",
            request_id: "d3c6e5a0",
            authority: "reviews:9080",
            upstream_host: Some("10.0.0.7:9080".parse().unwrap()),
            upstream_cluster: "reviews.default.svc.cluster.local",
            downstream_local_address: "10.96.0.12:9080".parse().unwrap(),
            downstream_remote_address: "10.0.0.3:41234".parse().unwrap(),
            route_name: "VirtualService default/reviews http[0]",
            downstream_peer_identity: "spiffe://cluster.local/ns/default/sa/productpage",
            audit: None,
        }
    }

    #[test]
    fn text_lines_follow_istios_default_format() {
        let mut line = Vec::new();
        text(&mut line, &entry());
        assert_eq!(
            String::from_utf8(line).unwrap(),
            "[2025-12-02T09:38:15.692Z] \"GET /reviews/0 HTTP/1.1\" 200 - via_upstream - \"-\" 0 358 4 - \"-\" \"curl/8.5.0\" \"d3c6e5a0\" \"reviews:9080\" \"10.0.0.7:9080\" reviews.default.svc.cluster.local - 10.96.0.12:9080 10.0.0.3:41234 - VirtualService default/reviews http[0] identity=spiffe://cluster.local/ns/default/sa/productpage"
        );
    }

    #[test]
    fn json_lines_use_istios_keys_and_carry_the_audit() {
        let mut line = Vec::new();
        json(
            &mut line,
            &Entry {
                audit: Some("default/audit-all"),
                ..entry()
            },
        );
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["start_time"], "2025-12-02T09:38:15.692Z");
        assert_eq!(v["response_code"], 200);
        assert_eq!(v["upstream_host"], "10.0.0.7:9080");
        assert_eq!(v["x_forwarded_for"], serde_json::Value::Null);
        assert_eq!(v["audit_policy"], "default/audit-all");
        assert_eq!(v["duration"], 4);
    }

    #[test]
    fn lines_are_held_until_a_flush() {
        let log = AccessLog::new(Format::Json);
        log.log(&entry());
        assert!(!log.buffer.lock().unwrap().is_empty());
        log.flush();
        assert!(log.buffer.lock().unwrap().is_empty());
        let off = AccessLog::new(Format::Off);
        off.log(&entry());
        assert!(off.buffer.lock().unwrap().is_empty());
    }
}
