//! `mesh-pod`: the process that plays a pod (or a node's host process) in the test
//! cluster. It joins its cgroup and network namespace first, before any thread
//! exists, then serves an echo, runs an echo client, does an HTTP GET, or execs.
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use clap::{Parser, Subcommand};
use tests::workload;

#[derive(Parser)]
#[command(name = "mesh-pod", about = "A pod of the mesh-agent test cluster")]
struct Cli {
    /// Network namespace to enter first (e.g. /run/netns/NAME).
    #[arg(long)]
    netns: Option<PathBuf>,
    /// cgroup v2 directory to move this process into first.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Dual-stack TCP echo server on [::]:PORT for every --port; each connection first
    /// gets `PEER <client ip:port>`. Prints `READY <ports>` once listening.
    Serve {
        #[arg(long = "port", required = true)]
        ports: Vec<u16>,
    },
    /// Connect, read the PEER line, send BYTES of a pattern, check the echo; prints one
    /// JSON report line and exits 0 iff it was byte-exact.
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// Send at once, before the server's PEER line.
        #[arg(long)]
        eager: bool,
        /// Request and response: TURNS writes of an equal share of BYTES, each echoed in
        /// full before the next.
        #[arg(long, default_value_t = 1)]
        turns: u32,
    },
    /// Hold a connection to an echo server open for SECONDS, exchanging a little data
    /// every 20 ms; exits 0 iff it lasted (prints when and how it broke otherwise).
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        seconds: u64,
    },
    /// New connections to each echo server TO (repeatable), one after another per server,
    /// for SECONDS; prints one JSON line counting them and their failures by kind, and
    /// exits 0 iff none failed.
    Churn {
        #[arg(long = "to", required = true)]
        to: Vec<SocketAddr>,
        #[arg(long)]
        seconds: u64,
    },
    /// Open COUNT connections to an echo server, exchange a byte on each, print
    /// `READY <count>`, then keep them idle for SECONDS.
    HoldIdle {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        seconds: u64,
    },
    /// Open COUNT connections, send the bytes SEND (hex) on each and nothing more, print
    /// `READY <count>`, then hold them for SECONDS (half-open handshakes).
    HalfOpen {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value = "")]
        send: String,
        #[arg(long)]
        seconds: u64,
    },
    /// HTTP/1.1 GET http://HOST:PORT/PATH; prints the status code, then the body.
    HttpGet {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
        host: IpAddr,
        #[arg(long, default_value_t = 5_000)]
        timeout_ms: u64,
    },
    /// HTTP/1.1 and HTTP/2 echo server on [::]:PORT answering JSON with NAME, the request
    /// line and its headers. Prints `READY <port>` once listening.
    ServeEcho {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        name: String,
    },
    /// A Bookinfo service on [::]:9080 (`tests::bookinfo`): SERVICE at VERSION, as pod NAME,
    /// its backends at `--backend details=ADDR` (repeatable). Prints `READY 9080`.
    ServeBookinfo {
        #[arg(long, value_enum)]
        service: tests::bookinfo::Service,
        #[arg(long, default_value = "v1")]
        version: String,
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = parse_backend)]
        backend: Vec<(String, SocketAddr)>,
    },
    /// GET PATH over TLS from TO with SNI (accepting any certificate); prints the status,
    /// the certificate presented (hex DER), the ALPN protocol and the body as JSON.
    TlsGet {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        sni: String,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Sends CALLS (a JSON list of {method, path, host, headers, count}) over one
    /// keep-alive connection to TO; prints the JSON list of replies.
    HttpCalls {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        h2: bool,
        #[arg(long)]
        calls: String,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Calls the gRPC echo (`mesh.test.Echo`) at TO: METHOD is its path, MESSAGES a JSON
    /// list of {message, fail_with}, HEADERS a JSON list of [name, value] sent as metadata;
    /// prints the outcome (status code, message, replies) as JSON.
    GrpcCall {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        method: String,
        #[arg(long)]
        messages: String,
        #[arg(long, default_value = "[]")]
        headers: String,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// DNS server (UDP and TCP) on 0.0.0.0:PORT answering A records of each
    /// `--answer NAME=IP`, NXDOMAIN for anything else, and an empty truncated UDP answer
    /// for each `--truncate NAME`; with `--mute`, nothing. Prints `READY <port>`, then `QUERY <udp|tcp> <name>
    /// <type>` per query.
    ServeDns {
        #[arg(long, default_value_t = 53)]
        port: u16,
        #[arg(long = "answer", value_parser = parse_answer)]
        answers: Vec<(String, IpAddr)>,
        #[arg(long)]
        truncate: Vec<String>,
        /// Answer nothing (a server that is down without refusing).
        #[arg(long)]
        mute: bool,
    },
    /// One DNS query of NAME (type `a` or `aaaa`) to SERVER over UDP (unconnected) or
    /// `--tcp`; prints a JSON report: where the answer came from, rcode, records.
    DnsQuery {
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "a")]
        qtype: String,
        #[arg(long)]
        tcp: bool,
    },
    /// getaddrinfo(NAME), with RESOLV_CONF bind-mounted over /etc/resolv.conf for this
    /// process; prints the addresses as a JSON list.
    Resolve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        resolv_conf: Option<PathBuf>,
    },
    /// RATE DNS queries/s of NAME (A) to SERVER over UDP for SECONDS; prints a JSON report
    /// (sent, answered, answer times).
    DnsLoad {
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        name: String,
        #[arg(long)]
        rate: u32,
        #[arg(long)]
        seconds: u64,
    },
    /// Slow reader on [::]:PORT: leaves each connection unread for PAUSE_MS, then reads it
    /// to its end, checks the pattern and answers `SINK <bytes> ok|bad`. Prints
    /// `READY <port>`.
    ServeSlow {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        pause_ms: u64,
    },
    /// Writes the pattern to a slow reader at TO as fast as the kernel takes it for
    /// FLOOD_MS, then ends the stream and waits for the reader's count; prints a JSON
    /// report (bytes taken, the node's TCP memory before and during, bytes read, order).
    Flood {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        flood_ms: u64,
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
    },
    /// Replace this process with COMMAND (after entering the namespace and cgroup).
    Exec {
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = workload::enter(cli.netns.as_deref(), cli.cgroup.as_deref()) {
        eprintln!("mesh-pod: {error:#}");
        return ExitCode::from(125);
    }
    match cli.command {
        Cmd::ServeDns {
            port,
            answers,
            truncate,
            mute,
        } => {
            let config = tests::dns_workload::ServerConfig {
                port,
                answers: answers.into_iter().collect(),
                truncate,
                mute,
            };
            match tests::dns_workload::serve(config) {
                Ok(never) => match never {},
                Err(error) => {
                    eprintln!("mesh-pod serve-dns: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::DnsQuery {
            server,
            name,
            qtype,
            tcp,
        } => {
            let qtype = match qtype.as_str() {
                "a" => mesh_agent::dns::wire::TYPE_A,
                "aaaa" => mesh_agent::dns::wire::TYPE_AAAA,
                other => {
                    eprintln!("mesh-pod dns-query: --qtype {other:?} is not a or aaaa");
                    return ExitCode::FAILURE;
                }
            };
            print_json(
                "dns-query",
                tests::dns_workload::query(server, &name, qtype, tcp),
            )
        }
        Cmd::Resolve { name, resolv_conf } => print_json(
            "resolve",
            tests::dns_workload::getaddrinfo(&name, resolv_conf.as_deref()),
        ),
        Cmd::DnsLoad {
            server,
            name,
            rate,
            seconds,
        } => print_json(
            "dns-load",
            tests::dns_workload::load(server, &name, rate, Duration::from_secs(seconds)),
        ),
        Cmd::ServeBookinfo {
            service,
            version,
            name,
            backend,
        } => {
            let config = tests::bookinfo::Config {
                service,
                version,
                pod: name,
                backends: backend.into_iter().collect(),
            };
            match tests::bookinfo::serve(config) {
                Ok(never) => match never {},
                Err(error) => {
                    eprintln!("mesh-pod serve-bookinfo: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::ServeSlow { port, pause_ms } => {
            match tests::flood_workload::serve_slow(port, Duration::from_millis(pause_ms)) {
                Ok(never) => match never {},
                Err(error) => {
                    eprintln!("mesh-pod serve-slow: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Flood {
            to,
            flood_ms,
            timeout_ms,
        } => print_json(
            "flood",
            tests::flood_workload::flood(
                to,
                Duration::from_millis(flood_ms),
                Duration::from_millis(timeout_ms),
            ),
        ),
        Cmd::ServeEcho { port, name } => match tests::http_workload::serve_echo(port, name) {
            Ok(never) => match never {},
            Err(error) => {
                eprintln!("mesh-pod serve-echo: {error:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::TlsGet {
            to,
            sni,
            path,
            timeout_ms,
        } => {
            match tests::http_workload::tls_get(to, &sni, &path, Duration::from_millis(timeout_ms))
            {
                Ok(reply) => {
                    println!("{}", serde_json::to_string(&reply).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("mesh-pod tls-get: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::HttpCalls {
            to,
            h2,
            calls,
            timeout_ms,
        } => {
            let calls: Vec<tests::http_workload::Call> = match serde_json::from_str(&calls) {
                Ok(c) => c,
                Err(error) => {
                    eprintln!("mesh-pod http-calls: --calls: {error}");
                    return ExitCode::FAILURE;
                }
            };
            match tests::http_workload::run_calls(to, h2, &calls, Duration::from_millis(timeout_ms))
            {
                Ok(replies) => {
                    println!("{}", serde_json::to_string(&replies).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("mesh-pod http-calls: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::GrpcCall {
            to,
            method,
            messages,
            headers,
            timeout_ms,
        } => {
            let parsed = serde_json::from_str(&messages)
                .map_err(|e| format!("--messages: {e}"))
                .and_then(|m: Vec<_>| {
                    let h: Vec<(String, String)> =
                        serde_json::from_str(&headers).map_err(|e| format!("--headers: {e}"))?;
                    Ok((m, h))
                });
            let (messages, headers) = match parsed {
                Ok(p) => p,
                Err(error) => {
                    eprintln!("mesh-pod grpc-call: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let timeout = Duration::from_millis(timeout_ms);
            match tests::grpc_workload::call(to, &method, &messages, &headers, timeout) {
                Ok(outcome) => {
                    println!("{}", serde_json::to_string(&outcome).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("mesh-pod grpc-call: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Serve { ports } => match workload::serve(&ports) {
            Ok(never) => match never {},
            Err(error) => {
                eprintln!("mesh-pod serve: {error:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Connect {
            to,
            bytes,
            timeout_ms,
            eager,
            turns,
        } => {
            let timeout = Duration::from_millis(timeout_ms);
            let report = if turns > 1 {
                workload::connect_in_turns(to, bytes, timeout, turns)
            } else {
                workload::connect(to, bytes, timeout, eager)
            };
            match serde_json::to_string(&report) {
                Ok(json) => println!("{json}"),
                Err(error) => {
                    eprintln!("mesh-pod connect: {error}");
                    return ExitCode::FAILURE;
                }
            }
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Cmd::Hold { to, seconds } => match workload::hold(to, Duration::from_secs(seconds)) {
            Ok(()) => {
                println!("held");
                ExitCode::SUCCESS
            }
            Err(error) => {
                println!("broken: {error:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Churn { to, seconds } => {
            let report = workload::churn(&to, Duration::from_secs(seconds));
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            if report.failures() == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Cmd::HoldIdle { to, count, seconds } => {
            match workload::hold_idle(to, count, Duration::from_secs(seconds)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("mesh-pod hold-idle: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::HalfOpen {
            to,
            count,
            send,
            seconds,
        } => {
            let bytes: Result<Vec<u8>, _> = (0..send.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(send.get(i..i + 2).unwrap_or("x"), 16))
                .collect();
            let Ok(bytes) = bytes else {
                eprintln!("mesh-pod half-open: --send {send:?} is not hex");
                return ExitCode::FAILURE;
            };
            match workload::half_open(to, count, &bytes, Duration::from_secs(seconds)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("mesh-pod half-open: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::HttpGet {
            port,
            path,
            host,
            timeout_ms,
        } => match workload::http_get(
            SocketAddr::new(host, port),
            &path,
            Duration::from_millis(timeout_ms),
        ) {
            Ok((status, body)) => {
                println!("{status}");
                print!("{body}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("mesh-pod http-get: {error:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Exec { command } => {
            let error = Command::new(&command[0]).args(&command[1..]).exec();
            eprintln!("mesh-pod exec {:?}: {error}", command[0]);
            ExitCode::from(127)
        }
    }
}

/// `NAME=ADDR`.
/// Prints `result` as one JSON line (exit 0), or its error (exit 1).
fn print_json<T: serde::Serialize>(command: &str, result: anyhow::Result<T>) -> ExitCode {
    match result {
        Ok(report) => {
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("mesh-pod {command}: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_answer(text: &str) -> Result<(String, IpAddr), String> {
    let (name, ip) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected NAME=IP"))?;
    let ip = ip.parse().map_err(|e| format!("{text:?}: {e}"))?;
    Ok((name.to_ascii_lowercase(), ip))
}

fn parse_backend(text: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected NAME=ADDRESS:PORT"))?;
    let addr = addr
        .parse()
        .map_err(|e| format!("{text:?}: {addr:?} is not an address and port: {e}"))?;
    Ok((name.to_owned(), addr))
}
