//! An OTLP/HTTP trace receiver for the tests: listens in a pod's network namespace, takes
//! `POST /v1/traces` with OTLP's JSON encoding, and keeps every span it is sent.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

/// One span as received, with its proxy's `service.name`.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: Option<String>,
    pub name: String,
    /// String attributes by key.
    pub attributes: std::collections::BTreeMap<String, String>,
}

pub struct Receiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

impl Receiver {
    /// Listens on `addr` inside the network namespace at `netns`; serves until the process
    /// ends (the listener's thread is detached; nothing else refers to it).
    pub fn start(netns: &Path, addr: SocketAddr) -> Result<Receiver> {
        let listener = crate::in_netns(netns, move || TcpListener::bind(addr))?
            .with_context(|| format!("binding the OTLP receiver on {addr}"))?;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let kept = spans.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let kept = kept.clone();
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    let _ = serve(stream, &kept);
                });
            }
        });
        Ok(Receiver { addr, spans })
    }

    /// `http://ADDR`, what `--otlp-endpoint` takes.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The spans of trace `trace_id` received so far.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

/// Requests on one connection until it closes: each body parsed and its spans kept.
fn serve(stream: std::net::TcpStream, spans: &Mutex<Vec<ReceivedSpan>>) -> Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header)?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse()?;
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        let status = match parse(&body) {
            Ok(mut received) => {
                spans.lock().unwrap().append(&mut received);
                "200 OK"
            }
            Err(_) => "400 Bad Request",
        };
        write!(writer, "HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n")?;
    }
}

fn parse(body: &[u8]) -> Result<Vec<ReceivedSpan>> {
    let v: Value = serde_json::from_slice(body)?;
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let attributes = |list: &Value| {
        list.as_array()
            .into_iter()
            .flatten()
            .map(|a| (text(&a["key"]), text(&a["value"]["stringValue"])))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let mut out = Vec::new();
    for rs in v["resourceSpans"].as_array().context("resourceSpans")? {
        let service = attributes(&rs["resource"]["attributes"])
            .remove("service.name")
            .unwrap_or_default();
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for s in ss["spans"].as_array().into_iter().flatten() {
                out.push(ReceivedSpan {
                    service: service.clone(),
                    trace_id: text(&s["traceId"]),
                    span_id: text(&s["spanId"]),
                    parent_span_id: s["parentSpanId"].as_str().map(str::to_owned),
                    name: text(&s["name"]),
                    attributes: attributes(&s["attributes"]),
                });
            }
        }
    }
    Ok(out)
}
