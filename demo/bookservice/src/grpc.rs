//! The bookservice over gRPC (tonic, h2c): `bookstore.Books` with ListBooks, GetBook and
//! GetReviews, the same books and the same v1–v4 behaviours as the JSON API. Messages are
//! prost types written out here, so that building needs no protoc.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codec::ProstCodec;
use tonic::{Request, Response, Status};

pub const SERVICE: &str = "bookstore.Books";

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListBooksRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BookRequest {
    #[prost(uint32, tag = "1")]
    pub id: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Book {
    #[prost(uint32, tag = "1")]
    pub id: u32,
    #[prost(string, tag = "2")]
    pub title: String,
    #[prost(string, tag = "3")]
    pub author: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BookList {
    #[prost(message, repeated, tag = "1")]
    pub books: Vec<Book>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Reviews {
    #[prost(uint32, tag = "1")]
    pub id: u32,
    #[prost(string, repeated, tag = "2")]
    pub reviews: Vec<String>,
}

/// What the service answers with; the JSON API's `State` behind it.
pub trait Catalogue: Send + Sync + 'static {
    fn books(&self) -> Vec<Book>;
    fn reviews(&self, id: u32) -> Option<Vec<String>>;
    /// v3: how long loading reviews takes.
    fn reviews_delay(&self) -> Duration;
    /// v4: whether the reviews of this book fail.
    fn reviews_fail(&self, id: u32) -> bool;
}

/// The gRPC service, routed by method path as tonic's generated code does.
pub struct Books<C>(pub std::sync::Arc<C>);

impl<C> Clone for Books<C> {
    fn clone(&self) -> Self {
        Books(std::sync::Arc::clone(&self.0))
    }
}

impl<C> tonic::server::NamedService for Books<C> {
    const NAME: &'static str = SERVICE;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A server-side codec for one method's message types.
fn grpc<Resp, Req>() -> tonic::server::Grpc<ProstCodec<Resp, Req>>
where
    Resp: prost::Message + Send + 'static,
    Req: prost::Message + Default + Send + 'static,
{
    tonic::server::Grpc::new(ProstCodec::default())
}

impl<C: Catalogue> tower::Service<http::Request<tonic::body::Body>> for Books<C> {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let c = std::sync::Arc::clone(&self.0);
        let method = req
            .uri()
            .path()
            .strip_prefix(&format!("/{SERVICE}/"))
            .unwrap_or("")
            .to_string();
        Box::pin(async move {
            Ok(match method.as_str() {
                "ListBooks" => {
                    let svc = tower::service_fn(move |_: Request<ListBooksRequest>| {
                        let books = c.books();
                        async move { Ok::<_, Status>(Response::new(BookList { books })) }
                    });
                    grpc().unary(svc, req).await
                }
                "GetBook" => {
                    let svc = tower::service_fn(move |r: Request<BookRequest>| {
                        let id = r.get_ref().id;
                        let book = c.books().into_iter().find(|b| b.id == id);
                        async move {
                            book.map(Response::new)
                                .ok_or_else(|| Status::not_found("no such book"))
                        }
                    });
                    grpc().unary(svc, req).await
                }
                "GetReviews" => {
                    let svc = tower::service_fn(move |r: Request<BookRequest>| {
                        let c = std::sync::Arc::clone(&c);
                        async move {
                            let id = r.get_ref().id;
                            tokio::time::sleep(c.reviews_delay()).await;
                            if c.reviews_fail(id) {
                                return Err(Status::internal("reviews unavailable"));
                            }
                            let reviews = c
                                .reviews(id)
                                .ok_or_else(|| Status::not_found("no such book"))?;
                            Ok(Response::new(Reviews { id, reviews }))
                        }
                    });
                    grpc().unary(svc, req).await
                }
                _ => Status::unimplemented(format!("no method {method}")).into_http(),
            })
        })
    }
}

/// A client of `bookstore.Books` over one h2c connection.
pub struct Client {
    grpc: tonic::client::Grpc<tonic::transport::Channel>,
}

impl Client {
    pub async fn connect(target: String) -> anyhow::Result<Client> {
        let channel = tonic::transport::Endpoint::from_shared(target)?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .user_agent("bookinfo-poller/1.0")?
            .connect()
            .await?;
        Ok(Client {
            grpc: tonic::client::Grpc::new(channel),
        })
    }

    async fn call<M1, M2>(&mut self, method: &'static str, message: M1) -> Result<M2, Status>
    where
        M1: prost::Message + Send + Sync + 'static,
        M2: prost::Message + Default + Send + Sync + 'static,
    {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let path = http::uri::PathAndQuery::try_from(format!("/{SERVICE}/{method}"))
            .expect("valid method path");
        let codec = ProstCodec::<M1, M2>::default();
        Ok(self
            .grpc
            .unary(Request::new(message), path, codec)
            .await?
            .into_inner())
    }

    pub async fn list_books(&mut self) -> Result<BookList, Status> {
        self.call("ListBooks", ListBooksRequest {}).await
    }

    pub async fn get_book(&mut self, id: u32) -> Result<Book, Status> {
        self.call("GetBook", BookRequest { id }).await
    }

    pub async fn get_reviews(&mut self, id: u32) -> Result<Reviews, Status> {
        self.call("GetReviews", BookRequest { id }).await
    }
}
