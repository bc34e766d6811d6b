//! Benchmark support for `mesh-bench`: the workloads it runs inside pods (a keep-alive
//! HTTP/1.1 server with fixed-size bodies, an open-loop fixed-rate client, a holder of
//! idle connections, a capture prober), parsers for iperf3 and wrk output, agent CPU
//! and RSS readings from /proc, and the min/median/max summary of repeated runs.

use std::convert::Infallible;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::workload::{READY_PREFIX, bind_dual_stack};

/// Body size of every response of [`serve_http`] unless told otherwise.
pub const HTTP_BODY_BYTES: usize = 1024;

/// What [`probe_capture`] prints once before its first attempt, so the caller knows it
/// runs before changing anything.
pub const PROBING: &str = "PROBING";
/// What [`probe_capture`] prints when a connection went to the agent's listener.
pub const CAPTURED: &str = "CAPTURED";

/// `/proc/<pid>/stat` counts CPU time in USER_HZ ticks, which the kernel fixes at 100
/// for user space on every architecture Linux runs on (whatever CONFIG_HZ is).
const USER_HZ: f64 = 100.0;

/// The largest request head [`serve_http`] buffers before dropping the connection.
const MAX_HEAD: usize = 64 * 1024;

/// The request both clients send: a plain keep-alive GET.
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: mesh-bench\r\n\r\n";

/// Raises the soft RLIMIT_NOFILE to the hard limit (servers and holders of thousands of
/// connections). Best effort: the limit stays as it was if the call fails.
pub fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// A complete `200 OK` response with a `body_bytes` body, announcing `Connection: close`
/// when `close`.
pub fn http_response(body_bytes: usize, close: bool) -> Vec<u8> {
    let mut response = format!(
        "HTTP/1.1 200 OK\r\nServer: mesh-bench\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {body_bytes}\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes();
    response.resize(response.len() + body_bytes, b'x');
    response
}

/// Where the head of the first request in `buf` ends: the index just past its blank
/// line (`\r\n\r\n`), if it is complete.
pub fn request_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Whether a request head asks for the connection to close after the response: a
/// `Connection: close` header, or HTTP/1.0 without `Connection: keep-alive`.
pub fn request_wants_close(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let http10 = lines
        .next()
        .is_some_and(|l| l.trim_end().ends_with("HTTP/1.0"));
    let mut close = http10;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if !name.trim().eq_ignore_ascii_case("connection") {
            continue;
        }
        for token in value.split(',').map(str::trim) {
            if token.eq_ignore_ascii_case("close") {
                close = true;
            } else if token.eq_ignore_ascii_case("keep-alive") && http10 {
                close = false;
            }
        }
    }
    close
}

/// A keep-alive HTTP/1.1 server on `[::]:port` (dual-stack) answering every request
/// (any method and path, bodies ignored, pipelining allowed) with `200 OK` and a
/// `body_bytes` body; it closes after the response when the request says
/// `Connection: close`. One thread (a current-thread tokio runtime), so its cost is
/// the same whatever carries the traffic. Prints `READY <port>` once listening.
pub fn serve_http(port: u16, body_bytes: usize) -> Result<Infallible> {
    raise_nofile_limit();
    let listener = bind_dual_stack(port)?;
    listener
        .set_nonblocking(true)
        .context("making the listener non-blocking")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the HTTP server's runtime")?;
    let listener = {
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(listener).context("registering the listener")?
    };
    let keep_alive: Arc<[u8]> = http_response(body_bytes, false).into();
    let close: Arc<[u8]> = http_response(body_bytes, true).into();
    println!("{READY_PREFIX} {port}");
    runtime.block_on(http_accept_loop(listener, keep_alive, close));
    bail!("the HTTP accept loop ended")
}

async fn http_accept_loop(
    listener: tokio::net::TcpListener,
    keep_alive: Arc<[u8]>,
    close: Arc<[u8]>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(http_connection(stream, keep_alive.clone(), close.clone()));
            }
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("serve-http: accept: {error}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn http_connection(
    mut stream: tokio::net::TcpStream,
    keep_alive: Arc<[u8]>,
    close: Arc<[u8]>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // HTTP/2 with prior knowledge (h2load, a waypoint forwarding HTTP/2): served by hyper,
    // with the same body as the HTTP/1.1 responses.
    let mut preface = [0u8; 3];
    if matches!(stream.peek(&mut preface).await, Ok(3)) && &preface == b"PRI" {
        let body_bytes = http_body_len(&keep_alive);
        let body = bytes::Bytes::from(vec![b'x'; body_bytes]);
        let service = hyper::service::service_fn(move |_req| {
            let body = body.clone();
            async move { Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(body))) }
        });
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .await;
        return;
    }
    let mut input: Vec<u8> = Vec::with_capacity(1024);
    let mut output: Vec<u8> = Vec::new();
    loop {
        match stream.read_buf(&mut input).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut consumed = 0;
        let mut closing = false;
        while let Some(end) = request_head_end(&input[consumed..]) {
            let head = &input[consumed..consumed + end];
            consumed += end;
            if request_wants_close(head) {
                output.extend_from_slice(&close);
                closing = true;
                break;
            }
            output.extend_from_slice(&keep_alive);
        }
        input.drain(..consumed);
        if input.len() > MAX_HEAD {
            return;
        }
        if !output.is_empty() {
            if stream.write_all(&output).await.is_err() {
                return;
            }
            output.clear();
        }
        if closing {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// One keep-alive GET on `stream` (through `reader`, a buffered clone of it): writes
/// the request, reads the status line, the headers and exactly `Content-Length` bytes.
fn get_once(
    stream: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
    line: &mut String,
    body: &mut Vec<u8>,
) -> io::Result<()> {
    stream.write_all(REQUEST)?;
    line.clear();
    reader.read_line(line)?;
    if !line.starts_with("HTTP/1.1 200") {
        return Err(io::Error::other(format!("unexpected status line {line:?}")));
    }
    let mut length = None;
    loop {
        line.clear();
        if reader.read_line(line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse::<usize>().ok();
        }
    }
    let length = length.ok_or_else(|| io::Error::other("response without Content-Length"))?;
    body.resize(length, 0);
    reader.read_exact(body)
}

fn connect(to: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let stream =
        TcpStream::connect_timeout(&to, timeout).with_context(|| format!("connecting to {to}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(stream)
}

/// What [`rate_load`] measured; `mesh-bench load-rate` prints it as one JSON line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateReport {
    /// Requests per second asked for.
    pub rate: f64,
    /// Responses completed per second of the run.
    pub achieved: f64,
    pub requests: u64,
    /// Requests that failed (their connection is then abandoned).
    pub errors: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// An open-loop load at a fixed `rate` of keep-alive GETs over `connections`
/// connections (opened before the clock starts) to the server of [`serve_http`], for
/// `duration`. Each connection sends on its own schedule (`connections / rate` apart,
/// staggered). A request's latency runs from its send to the end of its response body,
/// or from its scheduled time when it had to wait for the previous response (so a slow
/// response is not hidden by the requests it delayed: no coordinated omission).
pub fn rate_load(
    to: SocketAddr,
    rate: f64,
    connections: usize,
    duration: Duration,
) -> Result<RateReport> {
    if !rate.is_finite() || rate <= 0.0 || connections == 0 {
        bail!("load-rate needs a positive rate and at least one connection");
    }
    let streams = (0..connections)
        .map(|_| connect(to, Duration::from_secs(5)))
        .collect::<Result<Vec<_>>>()?;
    let interval = Duration::from_secs_f64(connections as f64 / rate);
    let start = Instant::now() + Duration::from_millis(20);
    let end = start + duration;
    let threads: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, stream)| {
            let first = start + interval.mul_f64(i as f64 / connections as f64);
            std::thread::spawn(move || paced_requests(stream, first, interval, end))
        })
        .collect();
    let mut latencies_ns = Vec::new();
    let mut errors = 0;
    for thread in threads {
        let (latencies, failed) = thread
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))?;
        latencies_ns.extend(latencies);
        errors += failed;
    }
    latencies_ns.sort_unstable();
    let us = |p: f64| percentile(&latencies_ns, p).map_or(f64::NAN, |ns| ns as f64 / 1e3);
    Ok(RateReport {
        rate,
        achieved: latencies_ns.len() as f64 / duration.as_secs_f64(),
        requests: latencies_ns.len() as u64,
        errors,
        p50_us: us(50.0),
        p90_us: us(90.0),
        p99_us: us(99.0),
        max_us: latencies_ns.last().map_or(f64::NAN, |&ns| ns as f64 / 1e3),
    })
}

/// One connection's share of [`rate_load`]: latencies in nanoseconds and errors.
fn paced_requests(
    mut stream: TcpStream,
    first: Instant,
    interval: Duration,
    end: Instant,
) -> (Vec<u64>, u64) {
    let mut latencies = Vec::new();
    let Ok(clone) = stream.try_clone() else {
        return (latencies, 1);
    };
    let mut reader = BufReader::new(clone);
    let (mut line, mut body) = (String::new(), Vec::new());
    let mut previous_done = first;
    for k in 0u32.. {
        let scheduled = first + interval * k;
        if scheduled >= end {
            break;
        }
        let now = Instant::now();
        if now < scheduled {
            std::thread::sleep(scheduled - now);
        }
        let sent = Instant::now();
        let begin = if previous_done > scheduled {
            scheduled
        } else {
            sent
        };
        if get_once(&mut stream, &mut reader, &mut line, &mut body).is_err() {
            return (latencies, 1);
        }
        let done = Instant::now();
        latencies.push((done - begin).as_nanos() as u64);
        previous_done = done;
    }
    (latencies, 0)
}

/// Nearest-rank percentile (`p` in 0..=100) of sorted values.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Opens `count` connections to the server of [`serve_http`], completes one GET on
/// each (so every hop of the path exists), prints `READY <count>`, then keeps them open
/// and idle for `duration`.
pub fn hold_connections(to: SocketAddr, count: usize, duration: Duration) -> Result<()> {
    raise_nofile_limit();
    let mut held = Vec::with_capacity(count);
    let (mut line, mut body) = (String::new(), Vec::new());
    for i in 0..count {
        let mut stream = connect(to, Duration::from_secs(10))
            .with_context(|| format!("connection {} of {count}", i + 1))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        get_once(&mut stream, &mut reader, &mut line, &mut body)
            .with_context(|| format!("GET on connection {} of {count} to {to}", i + 1))?;
        held.push(stream);
    }
    println!("{READY_PREFIX} {count}");
    std::thread::sleep(duration);
    drop(held);
    Ok(())
}

/// Where one connection to `to` went: a connection with one GET, returning the local
/// address of the client socket (loopback when the agent captured it).
pub fn check_path(to: SocketAddr) -> Result<SocketAddr> {
    let mut stream = connect(to, Duration::from_secs(5))?;
    let local = stream.local_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    get_once(
        &mut stream,
        &mut reader,
        &mut String::new(),
        &mut Vec::new(),
    )
    .with_context(|| format!("GET to {to}"))?;
    Ok(local)
}

/// Connects to `to` every `interval` until a connection lands on a loopback address
/// (the agent's outbound listener: the pod is captured), then prints `CAPTURED <µs>`.
/// Prints `PROBING` after its first uncaptured attempt. `to` should refuse or accept
/// connections quickly when not captured (a closed port of a pod).
pub fn probe_capture(to: SocketAddr, interval: Duration, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let mut announced = false;
    loop {
        if let Ok(stream) = TcpStream::connect_timeout(&to, Duration::from_millis(500))
            && stream.local_addr()?.ip().is_loopback()
        {
            println!("{CAPTURED} {}", start.elapsed().as_micros());
            return Ok(());
        }
        if !announced {
            println!("{PROBING}");
            announced = true;
        }
        if start.elapsed() > timeout {
            bail!("connections to {to} still not captured after {timeout:?}");
        }
        std::thread::sleep(interval);
    }
}

/// User plus system CPU seconds a process (all its threads, live and exited) has used.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = parse_stat_cpu_ticks(&text).with_context(|| format!("parsing {path}"))?;
    Ok(ticks as f64 / USER_HZ)
}

/// Busy CPU seconds of the whole machine since boot, all CPUs together (`/proc/stat`).
/// With the cores saturated, a path's busy seconds per unit of work bound its share of
/// the machine: what one path costs beside another, whichever process pays it.
pub fn machine_busy_seconds() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let ticks = parse_proc_stat_busy_ticks(&text).context("parsing /proc/stat")?;
    Ok(ticks as f64 / USER_HZ)
}

/// user + nice + system + irq + softirq of `/proc/stat`'s `cpu` line (guest time is in
/// user already); idle, I/O wait and the time the hypervisor stole are not busy.
pub fn parse_proc_stat_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal ...
    Some(f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)?)
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line; the command name in
/// parentheses may hold spaces and parentheses, so fields count from the last `)`.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

/// Resident set size of a process in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS")
}

/// The most resident a process has been since it started, in KiB (`VmHWM`).
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmHWM")
}

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_status_kib(&text, field).with_context(|| format!("no {field} line in {path}"))
}

/// Open file descriptors of a process (entries of `/proc/<pid>/fd`).
pub fn fd_count(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&path)
        .with_context(|| format!("reading {path}"))?
        .count() as u64)
}

/// The `VmRSS:   1234 kB` line of `/proc/<pid>/status`, in KiB.
pub fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The receiver-side totals of one `iperf3 -J` run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IperfResult {
    pub bits_per_second: f64,
    pub bytes: u64,
}

/// Reads `end.sum_received` of `iperf3 -J` output (all streams together); an `error`
/// member is an error.
pub fn parse_iperf3(json: &str) -> Result<IperfResult> {
    let value: serde_json::Value =
        serde_json::from_str(json).context("iperf3 output is not JSON")?;
    if let Some(error) = value.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {error}");
    }
    let sum = &value["end"]["sum_received"];
    let bits_per_second = sum["bits_per_second"]
        .as_f64()
        .context("iperf3 output has no end.sum_received.bits_per_second")?;
    let bytes = sum["bytes"]
        .as_u64()
        .context("iperf3 output has no end.sum_received.bytes")?;
    Ok(IperfResult {
        bits_per_second,
        bytes,
    })
}

/// The prefix of the line [`WRK_SCRIPT`] prints.
pub const WRK_PREFIX: &str = "WRKJSON ";

/// A wrk Lua script (`wrk -s`) that prints the run's totals and latency percentiles
/// (microseconds, from wrk's own histogram) as one JSON line after [`WRK_PREFIX`].
pub const WRK_SCRIPT: &str = r#"-- Written by mesh-bench: one JSON line with the totals and latency percentiles (us).
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\"requests\":%.0f,\"duration_us\":%.0f,\"bytes\":%.0f,\"errors\":%.0f,\"timeouts\":%.0f,\"mean_us\":%.1f,\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,\"max_us\":%.1f}\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect + e.read + e.write + e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
"#;

/// What one wrk run reported through [`WRK_SCRIPT`].
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct WrkResult {
    pub requests: f64,
    pub duration_us: f64,
    pub bytes: f64,
    /// Connect, read, write errors and non-2xx/3xx responses.
    pub errors: f64,
    pub timeouts: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl WrkResult {
    pub fn requests_per_second(&self) -> f64 {
        self.requests / (self.duration_us / 1e6)
    }
}

/// Finds the [`WRK_SCRIPT`] line in wrk's stdout.
pub fn parse_wrk(stdout: &str) -> Result<WrkResult> {
    let line = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix(WRK_PREFIX))
        .with_context(|| format!("no {WRK_PREFIX:?} line in wrk's output:\n{stdout}"))?;
    serde_json::from_str(line).with_context(|| format!("bad wrk summary {line:?}"))
}

/// The body length of a response made by [`http_response`].
fn http_body_len(response: &[u8]) -> usize {
    response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(0, |end| response.len() - end - 4)
}

/// What h2load reports of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct H2loadResult {
    pub requests_per_second: f64,
    pub succeeded: f64,
    pub failed: f64,
    /// Mean time per request (h2load gives no percentiles).
    pub mean_us: f64,
}

/// Parses h2load's summary (`finished in ..., N req/s`, `requests: ... succeeded, ...
/// failed`, `time for request: min max mean sd`).
pub fn parse_h2load(stdout: &str) -> Result<H2loadResult> {
    let field = |prefix: &str| {
        stdout
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .with_context(|| format!("no {prefix:?} line in h2load's output:\n{stdout}"))
    };
    let finished = field("finished in")?;
    let rps = finished
        .split(',')
        .find_map(|p| p.trim().strip_suffix(" req/s"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no req/s in {finished:?}"))?;
    let requests = field("requests:")?;
    let count = |what: &str| -> Result<f64> {
        requests
            .split(',')
            .find_map(|p| p.trim().strip_suffix(what))
            .and_then(|v| v.trim().rsplit(' ').next()?.parse().ok())
            .with_context(|| format!("no {what:?} in {requests:?}"))
    };
    let time = field("time for request:")?;
    let mean = time
        .trim_start_matches("time for request:")
        .split_whitespace()
        .nth(2)
        .and_then(duration_us)
        .with_context(|| format!("no mean in {time:?}"))?;
    Ok(H2loadResult {
        requests_per_second: rps,
        succeeded: count(" succeeded")?,
        failed: count(" failed")?,
        mean_us: mean,
    })
}

/// `123us`, `4.56ms`, `1.2s` in microseconds.
fn duration_us(text: &str) -> Option<f64> {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1e3)
    } else {
        (text.strip_suffix('s')?, 1e6)
    };
    Some(number.parse::<f64>().ok()? * scale)
}

/// Minimum, median and maximum of repeated measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub count: usize,
}

impl Summary {
    /// Of the finite samples; `None` if there are none. The median of an even count is
    /// the mean of the middle two.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Summary {
            min: v[0],
            median,
            max: v[n - 1],
            count: n,
        })
    }
}

/// Writes `contents` to `path` through a temporary file renamed over it, so a reader
/// polling `path` never sees half a file; returns once the rename is done.
pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.bench-tmp", name.to_string_lossy()));
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn h2load_summaries_parse() {
        let out = "starting benchmark...\n\
            finished in 2.01s, 9950.25 req/s, 10.50MB/s\n\
            requests: 20000 total, 20000 started, 20000 done, 19990 succeeded, 10 failed, 0 errored, 0 timeout\n\
            status codes: 19990 2xx, 0 3xx, 0 4xx, 10 5xx\n\
            time for request:      120us      8.41ms       402us       210us    85.00%\n";
        let r = parse_h2load(out).unwrap();
        assert_eq!(
            r,
            H2loadResult {
                requests_per_second: 9950.25,
                succeeded: 19990.0,
                failed: 10.0,
                mean_us: 402.0,
            }
        );
        assert!(parse_h2load("finished in 1s").is_err());
        assert_eq!(http_body_len(&http_response(1024, false)), 1024);
    }

    #[test]
    fn machine_busy_ticks_leave_out_idle_iowait_and_steal() {
        let stat = "cpu  100 2 30 5000 7 4 6 900 0 0\ncpu0 50 1 15 2500 3 2 3 450 0 0\nintr 1\n";
        assert_eq!(parse_proc_stat_busy_ticks(stat), Some(100 + 2 + 30 + 4 + 6));
        assert_eq!(parse_proc_stat_busy_ticks("cpu0 1 2 3 4 5 6 7\n"), None);
        assert_eq!(parse_proc_stat_busy_ticks("cpu  1 2 3\n"), None);
    }

    #[test]
    fn request_heads_are_found_only_when_complete() {
        assert_eq!(request_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(request_head_end(b"GET / HTTP/1.1\r\n\r\nGET"), Some(18));
    }

    #[test]
    fn connection_close_and_http10_close_but_keep_alive_keeps() {
        let cases: [(&[u8], bool); 6] = [
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", false),
            (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", true),
            (
                b"GET / HTTP/1.1\r\nconnection: Upgrade, Close\r\n\r\n",
                true,
            ),
            (b"GET / HTTP/1.0\r\n\r\n", true),
            (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", false),
            (b"GET / HTTP/1.1\r\nX-Connection: close\r\n\r\n", false),
        ];
        for (head, close) in cases {
            assert_eq!(
                request_wants_close(head),
                close,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn responses_carry_exactly_the_announced_body() {
        let response = http_response(1024, true);
        let end = request_head_end(&response).unwrap();
        let head = String::from_utf8_lossy(&response[..end]);
        assert!(head.contains("Content-Length: 1024\r\n"));
        assert!(head.contains("Connection: close\r\n"));
        assert_eq!(response.len() - end, 1024);
    }

    /// The server and both clients over loopback: keep-alive, pipelining, close.
    #[test]
    fn the_http_server_answers_keep_alive_pipelined_and_closing_requests() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let listener = {
                let _entered = runtime.enter();
                tokio::net::TcpListener::from_std(listener).unwrap()
            };
            runtime.block_on(http_accept_loop(
                listener,
                http_response(100, false).into(),
                http_response(100, true).into(),
            ));
        });
        assert!(check_path(addr).unwrap().ip().is_loopback());

        // Two pipelined requests, the second asking to close: two responses, then EOF.
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut all = Vec::new();
        stream.read_to_end(&mut all).unwrap();
        let text = String::from_utf8_lossy(&all);
        assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2);
        assert_eq!(all.len(), http_response(100, false).len() * 2 + 19);

        let report = rate_load(addr, 400.0, 2, Duration::from_millis(250)).unwrap();
        assert_eq!(report.errors, 0);
        assert!((80..=110).contains(&report.requests), "{report:?}");
        assert!(report.p50_us > 0.0 && report.p50_us <= report.p99_us);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile::<u32>(&[], 50.0), None);
    }

    #[test]
    fn cpu_ticks_count_from_the_last_parenthesis() {
        let stat = "4242 (mesh (agent) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    250 75 0 0 20 0 9 0 123 456789 1234 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(325));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
        let own = cpu_seconds(std::process::id()).unwrap();
        assert!(own >= 0.0);
    }

    #[test]
    fn vm_rss_is_read_in_kib() {
        let status = "Name:\tmesh-agent\nVmPeak:\t  99999 kB\nVmHWM:\t   22222 kB\nVmRSS:\t   12345 kB\nThreads:\t9\n";
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(12345));
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(22222));
        assert_eq!(parse_status_kib(status, "VmRS"), None);
        // The peak, read after the RSS, is at least that RSS whatever ran in between.
        let own = std::process::id();
        let rss = rss_kib(own).unwrap();
        assert!(peak_rss_kib(own).unwrap() >= rss);
    }

    #[test]
    fn iperf3_totals_and_errors() {
        let ok = r#"{"start":{},"end":{"sum_sent":{"bytes":10,"bits_per_second":1.0},
            "sum_received":{"bytes":1250000000,"bits_per_second":2.0e9}}}"#;
        assert_eq!(
            parse_iperf3(ok).unwrap(),
            IperfResult {
                bits_per_second: 2.0e9,
                bytes: 1_250_000_000
            }
        );
        let failed = r#"{"start":{},"end":{},"error":"unable to connect to server"}"#;
        assert!(
            parse_iperf3(failed)
                .unwrap_err()
                .to_string()
                .contains("unable to connect")
        );
    }

    #[test]
    fn the_wrk_script_line_is_parsed() {
        let out = "Running 1s test @ http://10.0.0.1:8080/\n  2 threads and 16 connections\n\
                   WRKJSON {\"requests\":20000,\"duration_us\":2000000,\"bytes\":22000000,\
                   \"errors\":0,\"timeouts\":0,\"mean_us\":700.5,\"p50_us\":650.0,\
                   \"p90_us\":900.0,\"p99_us\":1500.0,\"max_us\":9000.0}\n";
        let result = parse_wrk(out).unwrap();
        assert_eq!(result.requests_per_second(), 10_000.0);
        assert_eq!(result.p99_us, 1500.0);
        assert!(parse_wrk("Running 1s test").is_err());
        assert!(WRK_SCRIPT.contains(WRK_PREFIX.trim_end()));
    }

    #[test]
    fn summaries_ignore_missing_samples_and_take_the_middle() {
        let s = Summary::of(&[3.0, f64::NAN, 1.0, 2.0]).unwrap();
        assert_eq!((s.min, s.median, s.max, s.count), (1.0, 2.0, 3.0, 3));
        assert_eq!(Summary::of(&[1.0, 2.0, 3.0, 4.0]).unwrap().median, 2.5);
        assert_eq!(Summary::of(&[f64::NAN]), None);
    }
}

/// What [`storm`] measured; `mesh-bench storm` prints it as one JSON line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StormReport {
    /// New connections per second asked for.
    pub rate: f64,
    /// Connections attempted (one GET each, `Connection: close`).
    pub attempted: u64,
    /// Of those, the ones that failed (connect, request or response; 5 s each at most).
    pub failed: u64,
    /// The first failure, for the record.
    pub first_error: Option<String>,
    /// From the connection's scheduled start to the end of its response.
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Keep-alive connections held through the storm (a GET on each every second).
    pub live: u64,
    /// Of those, the ones that broke, and the first reason.
    pub live_lost: u64,
    pub first_live_error: Option<String>,
}

/// A connection storm: a new connection every `1 / rate` seconds for `duration`
/// (open loop: a slow connection does not delay the next) to the server of
/// [`serve_http`]; each does a GET, stays open for `hold`, then does a last GET with
/// `Connection: close` and reads to the end (so `rate * hold` connections are open at
/// once). With `hold` zero each connection does only that last GET: churn at a fixed
/// rate. Meanwhile `live` keep-alive connections, opened before the storm, each do a GET
/// every second; one that fails is a live connection lost.
pub fn storm(
    to: SocketAddr,
    rate: f64,
    duration: Duration,
    hold: Duration,
    live: usize,
) -> Result<StormReport> {
    if !rate.is_finite() || rate <= 0.0 {
        bail!("storm needs a positive rate");
    }
    raise_nofile_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the storm's runtime")?;
    runtime.block_on(storm_async(to, rate, duration, hold, live))
}

const STORM_TIMEOUT: Duration = Duration::from_secs(5);
const STORM_REQUEST: &[u8] =
    b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: mesh-bench\r\nConnection: close\r\n\r\n";

async fn storm_async(
    to: SocketAddr,
    rate: f64,
    duration: Duration,
    hold: Duration,
    live: usize,
) -> Result<StormReport> {
    use futures::FutureExt;
    use tokio::time::{Instant, sleep_until, timeout};
    let mut held = Vec::with_capacity(live);
    for i in 0..live {
        let stream = timeout(STORM_TIMEOUT, tokio::net::TcpStream::connect(to))
            .await
            .with_context(|| format!("live connection {i}: connect timed out"))?
            .with_context(|| format!("live connection {i} to {to}"))?;
        held.push(stream);
    }
    let start = Instant::now() + Duration::from_millis(20);
    let end = start + duration;
    let keepers: Vec<_> = held
        .into_iter()
        .enumerate()
        .map(|(i, stream)| {
            let first = start + Duration::from_secs(1).mul_f64(i as f64 / live.max(1) as f64);
            tokio::spawn(keep_alive_gets(stream, first, end))
        })
        .collect();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut attempts = Vec::new();
    let mut k: u32 = 0;
    loop {
        let scheduled = start + interval * k;
        if scheduled >= end {
            break;
        }
        sleep_until(scheduled).await;
        attempts.push(tokio::spawn(if hold.is_zero() {
            churn_connection(to).boxed()
        } else {
            held_connection(to, scheduled, hold).boxed()
        }));
        k += 1;
    }
    let mut latencies_ns = Vec::with_capacity(attempts.len());
    let (mut failed, mut first_error) = (0, None);
    for attempt in attempts {
        match attempt.await {
            Ok(Ok(elapsed)) => latencies_ns.push(elapsed.as_nanos() as u64),
            Ok(Err(e)) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(format!("task: {e}"));
            }
        }
    }
    let (mut live_lost, mut first_live_error) = (0, None);
    for keeper in keepers {
        let error = match keeper.await {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => format!("{e:#}"),
            Err(e) => format!("task: {e}"),
        };
        live_lost += 1;
        first_live_error.get_or_insert(error);
    }
    latencies_ns.sort_unstable();
    let us = |p: f64| percentile(&latencies_ns, p).map_or(f64::NAN, |ns| ns as f64 / 1e3);
    Ok(StormReport {
        rate,
        attempted: latencies_ns.len() as u64 + failed,
        failed,
        first_error,
        p50_us: us(50.0),
        p99_us: us(99.0),
        max_us: latencies_ns.last().map_or(f64::NAN, |&ns| ns as f64 / 1e3),
        live: live as u64,
        live_lost,
        first_live_error,
    })
}

/// One connection of a storm: a GET, `hold` open, a last GET. Timed from its scheduled
/// start (open loop) to the end of its first response.
async fn held_connection(
    to: SocketAddr,
    scheduled: tokio::time::Instant,
    hold: Duration,
) -> Result<Duration, String> {
    use tokio::time::timeout;
    let first = timeout(STORM_TIMEOUT, async {
        let mut stream = tokio::net::TcpStream::connect(to)
            .await
            .context("connect")?;
        async_get(&mut stream).await?;
        Ok::<_, anyhow::Error>(stream)
    })
    .await;
    let elapsed = scheduled.elapsed();
    let mut stream = match first {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(format!("{e:#}")),
        Err(_) => return Err(format!("no response within {STORM_TIMEOUT:?}")),
    };
    tokio::time::sleep(hold).await;
    match timeout(STORM_TIMEOUT, last_get(&mut stream)).await {
        Ok(Ok(())) => Ok(elapsed),
        Ok(Err(e)) => Err(format!("after {hold:?} open: {e:#}")),
        Err(_) => Err(format!(
            "after {hold:?} open: no response within {STORM_TIMEOUT:?}"
        )),
    }
}

/// One connection of churn: a GET with `Connection: close`, timed from `connect()` to the
/// end of its response (not from its scheduled start: the timer wakes the task up to a
/// millisecond late, which would swamp the connection's own time).
async fn churn_connection(to: SocketAddr) -> Result<Duration, String> {
    let began = tokio::time::Instant::now();
    let one = tokio::time::timeout(STORM_TIMEOUT, async {
        let mut stream = tokio::net::TcpStream::connect(to)
            .await
            .context("connect")?;
        last_get(&mut stream).await
    })
    .await;
    match one {
        Ok(Ok(())) => Ok(began.elapsed()),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(_) => Err(format!("no response within {STORM_TIMEOUT:?}")),
    }
}

/// The end of a storm connection: a GET with `Connection: close`, read to the end.
async fn last_get(stream: &mut tokio::net::TcpStream) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(STORM_REQUEST).await.context("request")?;
    let mut response = Vec::with_capacity(2048);
    stream
        .read_to_end(&mut response)
        .await
        .context("response")?;
    if !response.starts_with(b"HTTP/1.1 200") {
        bail!("unexpected response ({} bytes)", response.len());
    }
    Ok(())
}

/// A live connection through the storm: a keep-alive GET every second from `first` until
/// `end`, and one more at the end.
async fn keep_alive_gets(
    mut stream: tokio::net::TcpStream,
    first: tokio::time::Instant,
    end: tokio::time::Instant,
) -> Result<()> {
    let mut next = first;
    let started = tokio::time::Instant::now();
    loop {
        tokio::time::sleep_until(next).await;
        tokio::time::timeout(STORM_TIMEOUT, async_get(&mut stream))
            .await
            .context("no response within the timeout")?
            .with_context(|| format!("after {:?}", started.elapsed()))?;
        if next >= end {
            return Ok(());
        }
        next = (next + Duration::from_secs(1)).min(end);
    }
}

/// One keep-alive GET: the request, the head, exactly `Content-Length` body bytes.
async fn async_get(stream: &mut tokio::net::TcpStream) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(REQUEST).await?;
    let mut buf = Vec::with_capacity(2048);
    let head_end = loop {
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("connection closed");
        }
        if let Some(end) = request_head_end(&buf) {
            break end;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    if !head.starts_with("HTTP/1.1 200") {
        bail!("unexpected status line {:?}", head.lines().next());
    }
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .context("response without Content-Length")?;
    while buf.len() < head_end + length {
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("connection closed in the body");
        }
    }
    Ok(())
}
