//! gRPC test workloads, on tonic: the echo server answers the service `mesh.test.Echo`
//! (methods `Unary` and the bidirectional `Stream`) on its HTTP/2 port beside the HTTP
//! echo, and a client that calls it and reports the replies and the final status.
//!
//! The messages are JSON in gRPC's length-prefixed framing (a tonic [`Codec`]), so the
//! suite needs no protobuf compiler; what the waypoint sees is gRPC as any client sends it:
//! HTTP/2, `content-type: application/grpc`, `grpc-status` in the trailers.

use std::{collections::BTreeMap, marker::PhantomData, net::SocketAddr, pin::Pin, sync::Arc};

use anyhow::{Context, Result};
use bytes::{Buf, BufMut};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder, Streaming},
    codegen::{Context as TaskContext, Poll, Service, http::uri::PathAndQuery},
};

/// The service's methods, as paths.
pub const UNARY: &str = "/mesh.test.Echo/Unary";
pub const STREAM: &str = "/mesh.test.Echo/Stream";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EchoRequest {
    pub message: String,
    /// Answer with this gRPC status code instead of a reply (unary only).
    #[serde(default)]
    pub fail_with: Option<i32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EchoReply {
    pub pod: String,
    pub message: String,
    /// The `:authority` the server saw.
    pub authority: String,
    /// The request's headers (lower-case names) as the server saw them.
    pub headers: BTreeMap<String, String>,
}

/// Serde JSON in gRPC framing.
pub struct JsonCodec<E, D>(PhantomData<fn() -> (E, D)>);

impl<E, D> Default for JsonCodec<E, D> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

pub struct JsonEncoder<E>(PhantomData<fn() -> E>);
pub struct JsonDecoder<D>(PhantomData<fn() -> D>);

impl<E, D> Codec for JsonCodec<E, D>
where
    E: Serialize + Send + 'static,
    D: DeserializeOwned + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = JsonEncoder<E>;
    type Decoder = JsonDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        JsonEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        JsonDecoder(PhantomData)
    }
}

impl<E: Serialize> Encoder for JsonEncoder<E> {
    type Item = E;
    type Error = Status;

    fn encode(&mut self, item: E, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        serde_json::to_writer(dst.writer(), &item).map_err(|e| Status::internal(e.to_string()))
    }
}

impl<D: DeserializeOwned> Decoder for JsonDecoder<D> {
    type Item = D;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        serde_json::from_reader(src.reader())
            .map(Some)
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }
}

/// Whether an HTTP request is gRPC (and so for [`serve`]).
pub fn is_grpc<B>(req: &http::Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Answers one gRPC request to `mesh.test.Echo`.
pub async fn serve<B>(pod: &str, req: http::Request<B>) -> http::Response<tonic::body::Body>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send,
{
    let seen = Seen {
        pod: pod.into(),
        authority: req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default(),
        headers: Arc::new(
            req.headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
        ),
    };
    let mut grpc = tonic::server::Grpc::new(JsonCodec::<EchoReply, EchoRequest>::default());
    match req.uri().path() {
        UNARY => grpc.unary(seen, req).await,
        STREAM => grpc.streaming(seen, req).await,
        _ => Status::unimplemented("no such method").into_http(),
    }
}

/// What the server saw of a request, and answers with.
#[derive(Clone)]
struct Seen {
    pod: Arc<str>,
    authority: String,
    headers: Arc<BTreeMap<String, String>>,
}

impl Seen {
    fn reply(&self, message: String) -> EchoReply {
        EchoReply {
            pod: self.pod.to_string(),
            message,
            authority: self.authority.clone(),
            headers: (*self.headers).clone(),
        }
    }
}

impl Service<tonic::Request<EchoRequest>> for Seen {
    type Response = tonic::Response<EchoReply>;
    type Error = Status;
    type Future = std::future::Ready<Result<Self::Response, Status>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<EchoRequest>) -> Self::Future {
        let req = req.into_inner();
        std::future::ready(match req.fail_with {
            Some(code) => Err(Status::new(Code::from_i32(code), "failed as asked")),
            None => Ok(tonic::Response::new(self.reply(req.message))),
        })
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

impl Service<tonic::Request<Streaming<EchoRequest>>> for Seen {
    type Response = tonic::Response<ReplyStream>;
    type Error = Status;
    type Future = std::future::Ready<Result<Self::Response, Status>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<Streaming<EchoRequest>>) -> Self::Future {
        let seen = self.clone();
        let replies = req
            .into_inner()
            .map(move |m| m.map(|m| seen.reply(m.message)));
        std::future::ready(Ok(tonic::Response::new(Box::pin(replies) as ReplyStream)))
    }
}

/// What a client call saw: the replies and the final status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    /// The gRPC status code (0 = OK).
    pub code: i32,
    pub message: String,
    pub replies: Vec<EchoReply>,
}

/// Calls `method` (`UNARY` with the first message, or `STREAM` with all of them, one reply
/// awaited per message sent) on `to` over HTTP/2, with `headers` as metadata.
pub fn call(
    to: SocketAddr,
    method: &str,
    messages: &[EchoRequest],
    headers: &[(String, String)],
    timeout: std::time::Duration,
) -> Result<Outcome> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{to}"))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect()
            .await
            .with_context(|| format!("connecting to {to}"))?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.context("channel not ready")?;
        let path = PathAndQuery::try_from(method).context("method path")?;
        let codec = JsonCodec::<EchoRequest, EchoReply>::default();
        let result: Result<Vec<EchoReply>, Status> = if method == UNARY {
            let first = messages.first().context("no message")?.clone();
            grpc.unary(with_metadata(first, headers)?, path, codec)
                .await
                .map(|r| vec![r.into_inner()])
        } else {
            let outgoing = futures::stream::iter(messages.to_vec());
            match grpc
                .streaming(with_metadata(outgoing, headers)?, path, codec)
                .await
            {
                Ok(r) => {
                    let mut replies = Vec::new();
                    let mut stream = r.into_inner();
                    let mut end = Ok(());
                    while let Some(reply) = stream.next().await {
                        match reply {
                            Ok(r) => replies.push(r),
                            Err(s) => {
                                end = Err(s);
                                break;
                            }
                        }
                    }
                    end.map(|()| replies)
                }
                Err(s) => Err(s),
            }
        };
        Ok(match result {
            Ok(replies) => Outcome {
                code: 0,
                message: String::new(),
                replies,
            },
            Err(s) => Outcome {
                code: s.code() as i32,
                message: s.message().to_owned(),
                replies: Vec::new(),
            },
        })
    })
}

fn with_metadata<T>(message: T, headers: &[(String, String)]) -> Result<tonic::Request<T>> {
    let mut req = tonic::Request::new(message);
    for (k, v) in headers {
        req.metadata_mut().insert(
            tonic::metadata::MetadataKey::from_bytes(k.as_bytes())?,
            v.parse()?,
        );
    }
    Ok(req)
}
